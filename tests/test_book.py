"""Checks of the book's configuration that the Sphinx build alone would not catch, or would catch
only after a slow build: the table of contents points at real files, every chapter installs normlib
from the repository that _config.yml names, the launch buttons are set up, every cited key exists,
and the Binder environment installs the same torch as the Makefile.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# The first code cell of every chapter, word for word, with the repository filled in from
# _config.yml. On Colab and Binder it is what makes `import normlib` work.
SETUP_CELL = """\
# Setup: make `normlib` importable. In a clone of the repository, `make book`
# and `make test` have installed it; on Colab or Binder this installs it from
# the repository, keeping the preinstalled torch.
try:
    import normlib
except ImportError:
    %pip install --quiet \\
    "normlib[book] @ git+{url}@{branch}"
    import normlib"""

# {cite}`a,b`, {cite:p}`a`, {cite:t}`a`, {cite:ps}`a` ... as written in MyST markdown
CITE_ROLE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
BIB_KEY = re.compile(r"^@\w+\s*\{\s*([^,\s]+)\s*,", re.MULTILINE)


def load_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


def toc_files(node) -> list[str]:
    """Every `file:` entry of _toc.yml, plus the root, in reading order."""
    found = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                found.append(node[key])
        for value in node.values():
            if isinstance(value, (dict, list)):
                found += toc_files(value)
    elif isinstance(node, list):
        for item in node:
            found += toc_files(item)
    return found


def source_path(entry: str) -> Path | None:
    """The .md or .ipynb file a toc entry (written without suffix) refers to, or None."""
    for suffix in (".md", ".ipynb"):
        candidate = ROOT / f"{entry}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def notebooks() -> list[Path]:
    return sorted((ROOT / "chapters").glob("*.ipynb"))


def read_notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def book_sources() -> list[tuple[str, str]]:
    """(name, markdown text) of every page of the book and every markdown cell of every chapter."""
    texts = [(p.name, p.read_text(encoding="utf-8")) for p in sorted(ROOT.glob("*.md")) if p.name != "README.md"]
    for path in notebooks():
        for i, cell in enumerate(read_notebook(path)["cells"]):
            if cell["cell_type"] == "markdown":
                texts.append((f"{path.name} cell {i}", cell_source(cell)))
    return texts


def test_every_toc_entry_exists():
    entries = toc_files(load_yaml("_toc.yml"))
    assert entries, "_toc.yml lists no files"
    missing = [entry for entry in entries if source_path(entry) is None]
    assert not missing, f"_toc.yml names files that exist neither as .md nor as .ipynb: {missing}"


def test_every_chapter_notebook_is_in_the_toc():
    listed = {source_path(entry) for entry in toc_files(load_yaml("_toc.yml"))}
    orphans = [p.name for p in notebooks() if p not in listed]
    assert not orphans, f"notebooks in chapters/ missing from _toc.yml (the build would skip them): {orphans}"


def test_repository_is_named_once_and_complete():
    repository = load_yaml("_config.yml")["repository"]
    assert repository["url"].startswith("https://github.com/"), (
        "repository.url must be a GitHub URL: the Colab button and the setup cells need one"
    )
    assert not repository["url"].endswith((".git", "/")), "repository.url: give it without .git or a trailing slash"
    assert repository["branch"], "repository.branch must name the branch that notebooks install from"
    # "" is the repository root; "." would put "./" into every launch link
    assert repository["path_to_book"] == "", 'repository.path_to_book: the book is at the repository root, ""'


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_setup_cell_installs_from_the_configured_repository(path):
    repository = load_yaml("_config.yml")["repository"]
    expected = SETUP_CELL.format(url=repository["url"], branch=repository["branch"])
    code_cells = [c for c in read_notebook(path)["cells"] if c["cell_type"] == "code"]
    assert code_cells, f"{path.name} has no code cell"
    first = cell_source(code_cells[0]).strip()
    assert first == expected, (
        f"{path.name}: the first code cell must be the standard setup cell installing from "
        f"{repository['url']}@{repository['branch']} (see tests/test_book.py SETUP_CELL); found:\n{first}"
    )


def test_launch_buttons_for_binder_and_colab():
    config = load_yaml("_config.yml")
    buttons = config["launch_buttons"]
    assert buttons.get("binderhub_url") == "https://mybinder.org"
    assert buttons.get("colab_url") == "https://colab.research.google.com"
    assert config["html"].get("use_repository_button") is True
    # the site shows committed outputs; executing at build time would hide a stale notebook
    assert config["execute"]["execute_notebooks"] == "off"


def test_binder_installs_the_makefiles_torch_as_a_cpu_build():
    makefile_torch = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert makefile_torch, "Makefile: no `TORCH ?= torch==<version>` line"
    binder = (ROOT / "binder" / "requirements.txt").read_text()
    assert f"torch=={makefile_torch.group(1)}+cpu" in binder.splitlines(), (
        f"binder/requirements.txt must pin torch=={makefile_torch.group(1)}+cpu, the Makefile's torch as a CPU build"
    )
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in binder.splitlines()


def test_every_cited_key_is_in_references_bib():
    bib_files = load_yaml("_config.yml")["bibtex_bibfiles"]
    keys = set()
    for name in bib_files:
        keys |= set(BIB_KEY.findall((ROOT / name).read_text(encoding="utf-8")))
    assert keys, f"no entries found in {bib_files}"
    unknown = []
    for name, text in book_sources():
        for group in CITE_ROLE.findall(text):
            unknown += [f"{name}: {key.strip()}" for key in group.split(",") if key.strip() not in keys]
    assert not unknown, f"cited keys missing from {bib_files}: {unknown}"


def test_bib_keys_are_unique():
    text = (ROOT / "references.bib").read_text(encoding="utf-8")
    keys = BIB_KEY.findall(text)
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"references.bib defines these keys more than once: {duplicates}"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_names_its_lexer_so_every_chapter_highlights_alike(path):
    # Without language_info.pygments_lexer the site highlights the first cell as plain Python,
    # not IPython (the %pip line of the setup cell shows as an error)
    lexer = read_notebook(path)["metadata"].get("language_info", {}).get("pygments_lexer")
    assert lexer == "ipython3", f"{path.name}: language_info.pygments_lexer is {lexer!r}; re-execute the notebook"
