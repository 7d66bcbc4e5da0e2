"""The package's layers, read from the code: imports run one way and no module imports itself back.

Every import counts, also those inside functions; only imports under ``if TYPE_CHECKING:`` do not (they
never run). The layers, bottom to top (README, "Architecture"):

    method, compat, testing  <-  hparams  <-  training  <-  webui  <-  integration  <-  commands
                                                                      evaluation  <-  commands
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
    "training": {"method", "compat", "hparams"},
    "webui": {"method", "hparams", "training"},
    "integration": {"compat", "hparams", "training", "webui"},
    "evaluation": {"method", "compat"},
    "commands": {"method", "compat", "testing", "hparams", "training", "integration", "evaluation", "root"},
    "root": {"integration", "commands"},
}
# Parts that must not depend on LLaMA-Factory at all: the method is the paper's math, testing builds models.
WITHOUT_LLAMAFACTORY = {"method", "testing", "compat"}


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
    assert "tpo_plugin.method.noise" in graph["tpo_plugin.training.corruption"]
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
