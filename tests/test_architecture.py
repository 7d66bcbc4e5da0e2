"""The package's layers, read from the code: imports run one way and no module imports itself back.

Every import counts, also those inside functions; only imports under ``if TYPE_CHECKING:`` do not (they
never run). The layers, bottom to top (docs/architecture.md):

    method, compat, testing  <-  hparams  <-  fence  <-  training  <-  webui  <-  integration  <-  commands
                                                          evaluation  <-  commands

``fence`` is ``integration/internals.py``: LLaMA-Factory's private helpers that training reads. The rest of
``integration/`` (the start-up hook and the patches) installs training and the web UI into LLaMA-Factory, so it
sits above them; together they are the only place that touches LLaMA-Factory's private structure.
Inside ``training/`` the rooms import one way too (``TRAINING_ROOMS``).
"""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "tpo_plugin"

# Which of the package's parts each part may import (besides itself). Modules at the package root:
# ``__init__`` (the install() entry point) and ``__main__`` may reach the start-up hook and the commands.
ALLOWED = {
    "method": set(),
    "compat": set(),
    "testing": set(),
    "hparams": {"method"},
    "fence": {"compat"},
    "training": {"method", "compat", "hparams", "fence"},
    "webui": {"method", "hparams", "training"},
    "integration": {"compat", "hparams", "fence", "training", "webui"},
    "evaluation": {"method", "compat"},
    "commands": {"method", "compat", "testing", "hparams", "training", "integration", "evaluation", "root"},
    "root": {"integration", "commands"},
}
# Parts that must not depend on LLaMA-Factory at all: the method is the paper's math, testing builds models.
WITHOUT_LLAMAFACTORY = {"method", "testing", "compat"}
FENCE = "tpo_plugin.integration.internals"
# training/'s rooms, bottom to top: each imports only rooms before it (the trainer and the workflow are modules).
TRAINING_ROOMS = ["batch", "checks", "run", "reference", "diagnostics", "trainer", "workflow"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports at run time (a ``from X import Y`` yields X and X.Y)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    skipped = {id(node) for block in ast.walk(tree) if is_type_checking_block(block) for node in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {imported for imported in imported_names(path) if imported in modules and imported != name}
        for name, path in modules.items()
    }


def part(module: str) -> str:
    pieces = module.split(".")
    if module == FENCE:
        return "fence"
    if len(pieces) == 1 or (len(pieces) == 2 and pieces[1] in {"__main__"}):
        return "root"
    return pieces[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_reader_of_imports_sees_them():
    # The test's own reader, on known code: relative, absolute, function-level, and TYPE_CHECKING imports.
    graph = import_graph()
    assert "tpo_plugin.training.trainer" in graph["tpo_plugin.training.workflow"]  # imported inside run_tpo
    assert "tpo_plugin.training.workflow" in graph["tpo_plugin.integration.patches"]  # inside patch_tuner
    assert "tpo_plugin.method.noise" in graph["tpo_plugin.training.batch.corruption"]
    assert "tpo_plugin.hparams.tpo_args" not in graph["tpo_plugin.training.workflow"]  # TYPE_CHECKING only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back():
    assert find_cycle(import_graph()) is None


def test_parts_import_only_the_layers_below_them():
    graph = import_graph()
    assert {part(module) for module in graph} >= {"method", "training", "integration", "webui", "commands"}
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if part(target) != part(module) and part(target) not in ALLOWED[part(module)]
    ]
    assert wrong == []


@pytest.mark.parametrize("layer", sorted(WITHOUT_LLAMAFACTORY))
def test_layers_that_do_not_touch_llamafactory(layer):
    paths = [path for path in PACKAGE.rglob("*.py") if part(module_name(path)) == layer]
    assert paths
    for path in paths:
        assert not any(name.split(".")[0] == "llamafactory" for name in imported_names(path)), path


def training_room(module: str) -> str | None:
    pieces = module.split(".")
    return pieces[2] if len(pieces) > 2 and pieces[1] == "training" else None


def test_training_rooms_import_one_way():
    graph = import_graph()
    rooms = {training_room(module) for module in graph} - {None, "__init__"}
    assert rooms == set(TRAINING_ROOMS)
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if training_room(module) in TRAINING_ROOMS
        and training_room(target) in TRAINING_ROOMS
        and TRAINING_ROOMS.index(training_room(target)) > TRAINING_ROOMS.index(training_room(module))
    ]
    assert wrong == []


def all_imported_names(path: Path) -> set[str]:
    """Like :func:`imported_names`, with the imports under ``if TYPE_CHECKING:`` too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:  # relative: the module without its leading dots
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_trainer_and_the_token_view_do_not_know_each_other():
    trainer, token_view = PACKAGE / "training" / "trainer.py", PACKAGE / "training" / "diagnostics" / "token_view.py"
    assert not any("token_view" in name for name in all_imported_names(trainer))
    assert not any(name.endswith("trainer") or ".trainer." in name for name in all_imported_names(token_view))


def test_inspect_loads_nothing_on_its_own():
    # The run builder loads tokenizer, data, model, reference model and trainer; the command only asks it.
    names = all_imported_names(PACKAGE / "commands" / "inspect.py")
    assert not any(
        name.startswith(("llamafactory.data", "llamafactory.model", "llamafactory.train")) for name in names
    )
    assert not any(name.endswith("training.trainer") for name in names)
    assert "training.workflow.build_tpo_run" in names


def private_reads(path: Path) -> list[str]:
    """LLaMA-Factory's private structure that a module reads: names or modules with a leading underscore
    imported from llamafactory, and ``compat.require`` (the guard every private read goes through)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llamafactory"):
            pieces = node.module.split(".") + [alias.name for alias in node.names]
            found += [f"{node.module}: {piece}" for piece in pieces if piece.startswith("_")]
            if node.module.startswith(("llamafactory.data.processor", "llamafactory.data.loader")):
                found.append(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "require":
            found.append(f"require({ast.unparse(node.args[0])}, ...)")
    return found


def test_private_llamafactory_structure_is_read_only_in_integration():
    outside = {
        str(path.relative_to(PACKAGE)): reads
        for path in PACKAGE.rglob("*.py")
        if path.parent.name != "integration" and path.name != "compat.py" and (reads := private_reads(path))
    }
    assert outside == {}
    assert private_reads(PACKAGE / "integration" / "internals.py")  # the reader sees the fence's own reads
