"""api.md, the API reference: every public object of normlib is on it, in the file that defines it.

The page lists objects by hand (``:members:`` of each ``automodule``), so a new export would be
missing from it without this test; the Sphinx build (``make book``, with -W) checks the rest.
"""

from __future__ import annotations

import re
from pathlib import Path

import normlib

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "api.md"


def documented() -> set[str]:
    """Fully qualified names the page documents: module + each name of its ``:members:`` list,
    and every ``autoclass``/``autofunction`` target."""
    text = PAGE.read_text(encoding="utf-8")
    names = set()
    for module, members in re.findall(r"\.\. automodule:: (\S+)\n\s+:members: ([^\n]+)", text):
        names.update(f"{module}.{name.strip()}" for name in members.split(","))
    names.update(re.findall(r"\.\. auto(?:class|function):: (\S+)", text))
    return names


def test_every_export_of_normlib_is_documented_where_it_is_defined():
    names = documented()
    missing = []
    for name in normlib.__all__:
        obj = getattr(normlib, name)
        module = obj.__module__
        if f"{module}.{name}" not in names:
            missing.append(f"{name} (defined in {module})")
    assert not missing, f"api.md does not document: {missing}; add each to its module's :members:"


def test_the_page_is_in_the_reference_part_of_the_toc_and_sphinx_reads_docstrings():
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    reference = toc.split("caption: Reference", 1)[1]
    assert "- file: api" in reference
    config = (ROOT / "_config.yml").read_text(encoding="utf-8")
    for extension in ("sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon"):
        assert f"- {extension}" in config
    assert "## The benchmark" in PAGE.read_text(encoding="utf-8")
    assert "## Backends" in PAGE.read_text(encoding="utf-8")
