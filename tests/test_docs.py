"""The documentation states what the code does: the configuration page is generated from ``TPOArguments`` and
up to date, it documents every ``tpo_*`` key with the default the code uses, every page is in the site's nav, and
the README keeps the commands CI runs."""

import importlib.util
import re
from pathlib import Path

import yaml

from tpo_plugin.hparams.tpo_args import tpo_defaults


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("generate_configuration", DOCS / "generate_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_what_the_generator_writes():
    assert (DOCS / "configuration.md").read_text() == _generator().render(), (
        "docs/configuration.md is out of date: run `python docs/generate_configuration.py`"
    )


def test_configuration_page_documents_every_key_with_its_default():
    page = (DOCS / "configuration.md").read_text()
    rows = re.findall(r"^\| `(tpo_\w+)` \| [^|]+ \| `?([^|`]+?)`? \|", page, flags=re.MULTILINE)
    documented = {key: default.strip() for key, default in rows}
    assert set(documented) == set(tpo_defaults())
    for key, default in tpo_defaults().items():
        assert documented[key] == (str(default).lower() if isinstance(default, bool) else str(default)), key


class _Loader(yaml.SafeLoader):
    """mkdocs.yml names Python objects (``!!python/name:``); the nav does not need them."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def test_every_page_is_in_the_nav():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    in_nav = {page for entry in config["nav"] for page in entry.values()}
    pages = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    assert pages == in_nav


def test_readme_keeps_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install -e ".[test]" -c constraints/llamafactory-0.9.5.txt'
    assert install in ci and install in readme
    assert re.search(r"^pytest\b", readme, flags=re.MULTILINE)
    assert "tpo-plugin demo" in readme
    assert "stage: tpo" in readme


def test_pages_hold_no_control_characters():
    """A page written from a Python string that was not raw turns ``\\text`` into a tab and ``\\beta`` into a
    backspace: the equation then renders as garbage while every link still resolves."""
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            bad = sorted({hex(ord(char)) for char in line if ord(char) < 32})
            assert not bad, f"{page.relative_to(ROOT)}:{number} holds control characters {bad}: {line!r}"


def _anchors(page: Path) -> set[str]:
    from markdown.extensions.toc import slugify

    text = page.read_text()
    headings = re.findall(r"^#+ (.+?)\s*$", text, flags=re.MULTILINE)
    return {slugify(heading, "-") for heading in headings} | set(re.findall(r'id="([\w-]+)"', text))


def test_every_documentation_page_the_package_cites_exists():
    """A docstring's ``docs/method.md §2``, ``docs/method.md Eq. 3`` or ``docs/stability.md#anchor`` must exist."""
    sources = [
        *(ROOT / "tpo_plugin").rglob("*.py"),
        *(ROOT / "tests").glob("*.py"),
        *(ROOT / "recipes").rglob("*.yaml"),
        *(ROOT / "recipes").rglob("*.md"),
    ]
    method = (DOCS / "method.md").read_text()
    for source in sources:
        text = source.read_text()
        if source.name == "test_docs.py":  # its own examples are not citations
            continue
        for page, anchor in re.findall(r"docs/([\w/-]+\.md)(?:#([\w-]+))?", text):
            assert (DOCS / page).is_file(), f"{source.relative_to(ROOT)} cites docs/{page}, which does not exist"
            if anchor:
                assert anchor in _anchors(DOCS / page), f"{source.relative_to(ROOT)}: no #{anchor} in docs/{page}"
        for citation in re.findall(r"method\.md[ ,]*((?:(?:§|Eq\. )\d+[-–, ]*(?:and )?)+)", text):
            for kind, number in re.findall(r"(§|Eq\. )(\d+)", citation):
                label = f"## {number}. " if kind == "§" else f"(Eq. {number})"
                assert label in method, f"{source.relative_to(ROOT)} cites method.md {kind}{number}, not on the page"
