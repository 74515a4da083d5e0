"""The reference pages (glossary.md, claims.md) agree with the chapters they point into.

The book builds with ``-W``, so a {ref} to a target no chapter defines breaks the build; these tests
name the missing target directly and run in a fraction of a second. They also check completeness:
every claim a chapter settles is on the claims page, every term a chapter defines is in the
glossary, and every claim of the source documents (listed here explicitly, so the test does not
read anything outside the repository) has a row with a verdict.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLAIMS_PAGE = ROOT / "claims.md"
GLOSSARY_PAGE = ROOT / "glossary.md"

# The claims of the five source documents that the book settles: "<document>-<slug>", the id used
# in claims.md's first column and, prefixed with "claim-", as the target in the chapter that
# settles it. The first group is the starting list of the seeds' README; the rest were added by
# the chapters.
REQUIRED_CLAIMS = {
    "000-ln-normalizes-weights": "LayerNorm normalizes each layer's weights",
    "000-ln-cost": "LayerNorm takes more time and memory on large data sets",
    "000-dataset-size": "BatchNorm suits large data sets, LayerNorm small ones",
    "000-sequence-lengths": "BatchNorm's statistics stop fitting when sequence lengths differ",
    "000-bn-large-batch": "BatchNorm also does badly when the batch is too large",
    "000-ln-per-batch": "LayerNorm is computed per batch",
    "000-ln-prevents-overfitting": "LayerNorm prevents overfitting",
    "000-ln-more-stable": "LayerNorm trains more stably than BatchNorm",
    "001-convnext-ln": "ConvNeXt puts a LayerNorm before and after downsampling",
    "001-bn-divides-by-nhw": "BatchNorm divides by N*H*W, not N",
    "001-bn-noise-rl": "BatchNorm's noise hurts noise-sensitive methods such as RL",
    "001-ln-same-train-eval": "LayerNorm behaves the same in training and inference",
    "001-bn-train-eval-gap": "BatchNorm uses batch statistics in training, running ones in inference",
    "002-normalization-vs-standardization": "normalization scales to [0, 1], standardization to mean 0 and variance 1",
    "002-internal-covariate-shift": "BatchNorm works by reducing internal covariate shift",
    "002-transformers-use-ln": "Transformers use LayerNorm rather than BatchNorm",
    "002-ln-before-activation": "LayerNorm goes before the activation function",
    "003-bn-gradients": "BatchNorm mitigates vanishing and exploding gradients",
    "003-instance-norm": "InstanceNorm is a third common technique alongside BatchNorm and LayerNorm",
    "004-rmsnorm-formula": "RMSNorm is x / (RMS(x) + eps) with a learned shift",
    "004-no-torch-rmsnorm": "PyTorch has no built-in RMSNorm",
    "004-cost-table": "cost: BatchNorm medium, LayerNorm large, RMSNorm small",
    "004-rmsnorm-more-stable": "RMSNorm is more stable",
    "004-ln-in-cnns": "LayerNorm has little effect in CNNs",
    "004-ln-suits-rnns": "BatchNorm suits CNNs, LayerNorm suits RNNs",
    "004-bn-regularization": "BatchNorm regularizes, LayerNorm and RMSNorm do not",
}

# Words of the source documents that their readers will look up: each must appear in glossary.md,
# under the English term the book uses for it.
SOURCE_TERMS = (
    "归一化", "标准化", "正则化", "批归一化", "批量归一化", "批量标准化", "层归一化", "层标准化",
    "实例归一化", "内部协变量偏移", "小批量", "梯度消失", "梯度爆炸", "正态分布", "过拟合", "泛化能力",
    "收敛", "循环神经网络", "卷积神经网络", "多层感知机", "自注意力", "时间步", "在线学习", "降采样",
)

# The one scale of verdicts that claims.md defines; a row carries exactly one of them.
VERDICTS = {"right", "partly right", "wrong", "out of date", "unsettled"}

# Phrases that tell the story of how the book was made instead of teaching: references to work
# items ("the issue"), to when or while the text was written, to runs and sessions outside the
# notebook, and to a particular machine. A student cannot rerun or check any of these, and they
# age badly (CONTRIBUTING.md, "Writing for students"). Matched case-insensitively at a word start.
LAB_LOG_PHRASES = (
    "the issue",
    "this issue",
    "when this section was written",
    "when this chapter was written",
    "this chapter was written",
    "while writing",
    "when preparing this",
    "while preparing",
    "an earlier session",
    "this session",
    "earlier run",
    "a previous run",
    "not run here",
    "the course machine",
    "work item",
)

TARGET_LINE = re.compile(r"^\((?P<label>(?:claim|term|check)-[a-z0-9-]+)\)=\s*$", re.MULTILINE)
REF = re.compile(r"\{ref\}`(?P<body>[^`]+)`")
DOC = re.compile(r"\{doc\}`(?:[^`<]*<)?(?P<path>[^`>]+)>?`")
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`(?P<keys>[^`]+)`")
BIB_KEY = re.compile(r"^@\w+\{(?P<key>[^,\s]+),", re.MULTILINE)


def ref_label(body: str) -> tuple[str, bool]:
    """The label of a {ref} role and whether it has an explicit title (``text <label>``)."""
    match = re.fullmatch(r"(?s)(?P<title>.*\S)\s*<(?P<label>[^<>]+)>", body)
    if match:
        return match["label"].strip(), True
    return body.strip(), False


def defined_targets(root: Path = ROOT) -> dict[str, str]:
    """Every (claim-...)= and (term-...)= target of the book: label -> file that defines it."""
    found: dict[str, str] = {}
    pages = list(root.glob("*.md")) + list((root / "chapters").glob("*.md"))
    texts = [(page, page.read_text(encoding="utf-8")) for page in pages]
    for notebook in sorted((root / "chapters").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        markdown = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown"]
        texts.append((notebook, "\n\n".join(markdown)))
    for path, text in texts:
        for match in TARGET_LINE.finditer(text):
            found.setdefault(match["label"], str(path.relative_to(root)))
    return found


def referenced_labels(text: str) -> list[tuple[str, bool]]:
    return [ref_label(match["body"]) for match in REF.finditer(text)]


def claims_table_rows(text: str) -> list[list[str]]:
    """Cells of the claims table's body rows: a Markdown pipe table whose first column is the id."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|") or re.fullmatch(r"\|[\s:|-]+\|", line):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells and cells[0].lower() == "id":
            continue  # the header row
        rows.append(cells)
    return rows


def claim_row_problems(cells: list[str], targets: dict[str, str]) -> list[str]:
    """What is wrong with one row of the claims table, given the targets the book defines.

    A row has five cells (id, claim, source, verdict, settled by); its verdict is exactly one entry
    of VERDICTS (bold allowed); its last cell links, with {ref}, the chapter section
    ``claim-<id>`` that settles it, and every {ref} in the row points to a target that exists.
    """
    if len(cells) != 5:
        return [f"{len(cells)} cells instead of 5 (id, claim, source, verdict, settled by)"]
    claim_id, _claim, _source, verdict, settled_by = cells
    claim_id = claim_id.strip("`")
    problems = []
    if verdict.strip().strip("*").strip().lower() not in VERDICTS:
        problems.append(f"verdict {verdict!r} is not exactly one of {sorted(VERDICTS)}")
    labels = [label for label, _ in referenced_labels(" ".join(cells))]
    missing = sorted({label for label in labels if label not in targets})
    if missing:
        problems.append(f"links to targets that no chapter or page defines: {missing}")
    own = f"claim-{claim_id}"
    if own not in [label for label, _ in referenced_labels(settled_by)]:
        problems.append(f"the last cell does not link {{ref}} to the chapter section {own}")
    return problems


def glossary_order_problems(terms: list[str]) -> list[tuple[str, str]]:
    """Neighbouring glossary terms out of order: (earlier term, later term) pairs.

    The order is alphabetical by the English term, ignoring case (``str.casefold``), so that
    "BatchNorm" sorts among the b's and "re-centering" before "recurrent".
    """
    return [(a, b) for a, b in zip(terms, terms[1:]) if a.casefold() > b.casefold()]


def lab_log_phrases_in(text: str) -> list[str]:
    """The LAB_LOG_PHRASES that occur in text (case-insensitive, each starting at a word start)."""
    return [p for p in LAB_LOG_PHRASES if re.search(r"\b" + re.escape(p), text, re.IGNORECASE)]


def book_pages(root: Path = ROOT) -> list[Path]:
    """The pages of the book in _toc.yml order: the root and every ``file:`` entry, .md or .ipynb."""
    toc = (root / "_toc.yml").read_text(encoding="utf-8")
    names = re.findall(r"^\s*(?:root|-\s*file):\s*(\S+)\s*$", toc, re.MULTILINE)
    pages = []
    for name in names:
        for suffix in (".md", ".ipynb"):
            if (root / (name + suffix)).is_file():
                pages.append(root / (name + suffix))
                break
        else:
            pytest.fail(f"_toc.yml lists {name!r}, which is neither a .md page nor a notebook")
    return pages


def prose(page: Path) -> str:
    """The text a reader reads as prose: a .md page whole, a notebook's markdown cells."""
    text = page.read_text(encoding="utf-8")
    if page.suffix != ".ipynb":
        return text
    cells = json.loads(text)["cells"]
    return "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")


def uncited_keys(bib: str, texts: list[str]) -> list[str]:
    """The keys of a .bib file that no {cite} role in texts names, in the file's order."""
    cited = {key.strip() for text in texts for match in CITE.finditer(text) for key in match["keys"].split(",")}
    return [key for key in BIB_KEY.findall(bib) if key not in cited]


def read(page: Path) -> str:
    if not page.is_file():
        pytest.fail(f"{page.name} is missing; it is listed in _toc.yml")
    return page.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# The helpers themselves: they must be able to find a problem, or the tests below prove nothing.
# --------------------------------------------------------------------------------------------


def test_ref_label_reads_both_forms():
    assert ref_label("claim-001-convnext-ln") == ("claim-001-convnext-ln", False)
    assert ref_label("chapter 6 <claim-001-convnext-ln>") == ("claim-001-convnext-ln", True)


def test_defined_targets_finds_targets_in_notebooks_and_pages(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "page.md").write_text("(term-a)=\n## A\n\nnot a target: (term-b)= inline\n")
    notebook = {"cells": [
        {"cell_type": "markdown", "source": ["(claim-000-x)=\n", "### X\n"]},
        {"cell_type": "code", "source": ["# (claim-000-y)=\n"]},
    ]}
    (tmp_path / "chapters" / "01.ipynb").write_text(json.dumps(notebook))
    assert defined_targets(tmp_path) == {"term-a": "page.md", "claim-000-x": "chapters/01.ipynb"}


def test_claims_table_rows_skips_header_and_rule():
    text = "| id | claim |\n| --- | --- |\n| 001-x | a claim |\n\nprose | with a pipe\n"
    assert claims_table_rows(text) == [["001-x", "a claim"]]


def test_claim_row_problems_finds_each_kind_of_problem():
    targets = {"claim-001-x": "chapters/01.ipynb", "check-01-y": "chapters/01.ipynb"}
    good = ["001-x", "a claim", "001", "**Partly right**", "{ref}`chapter 1 <claim-001-x>` ({ref}`01-y <check-01-y>`)"]
    assert claim_row_problems(good, targets) == []
    assert claim_row_problems(good[:4], targets) == ["4 cells instead of 5 (id, claim, source, verdict, settled by)"]
    for verdict in ("wrong / partly right", "mostly right", "right, out of date", ""):
        problems = claim_row_problems([*good[:3], verdict, good[4]], targets)
        assert len(problems) == 1 and problems[0].startswith("verdict"), (verdict, problems)
    assert claim_row_problems([*good[:3], "unsettled", good[4]], targets) == []
    dangling = claim_row_problems([*good[:4], good[4] + ", {ref}`chapter 2 <claim-002-z>`"], targets)
    assert dangling == ["links to targets that no chapter or page defines: ['claim-002-z']"]
    only_a_paper = claim_row_problems([*good[:4], "{cite}`ba2016layer`"], targets)
    assert only_a_paper == ["the last cell does not link {ref} to the chapter section claim-001-x"]


def test_glossary_order_problems_is_case_insensitive_and_finds_swaps():
    assert glossary_order_problems(["AdaIN", "affine parameters", "BatchNorm", "Bessel's correction"]) == []
    assert glossary_order_problems(["re-centering", "recurrent neural network", "RMSNorm"]) == []
    assert glossary_order_problems(["warm-up", "vanishing gradients", "weight normalization"]) == [
        ("warm-up", "vanishing gradients")
    ]
    assert glossary_order_problems(["batch", "Affine"]) == [("batch", "Affine")]


def test_lab_log_phrases_in_finds_phrases_in_any_case_and_not_inside_words():
    assert lab_log_phrases_in("As The Issue asked, and in an earlier run, it held.") == ["the issue", "earlier run"]
    assert lab_log_phrases_in("Run it on the course machine.") == ["the course machine"]
    assert lab_log_phrases_in("BatchNorm's statistics; the tissue of the argument; rerun the cell.") == []


def test_uncited_keys_finds_entries_that_no_page_cites():
    bib = "@article{a2020x,\n  title = {A},\n}\n\n@inproceedings{b2021y,\n  title = {B},\n}\n"
    assert uncited_keys(bib, ["{cite:p}`a2020x,b2021y`"]) == []
    assert uncited_keys(bib, ["{cite:t}`a2020x`", "b2021y without a role"]) == ["b2021y"]


def test_book_pages_and_prose_read_the_toc_and_only_markdown_cells(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapters/01\n")
    (tmp_path / "intro.md").write_text("An intro.\n")
    notebook = {"cells": [
        {"cell_type": "markdown", "source": ["Prose ", "here."]},
        {"cell_type": "code", "source": ["# while preparing this, a comment\n"]},
    ]}
    (tmp_path / "chapters" / "01.ipynb").write_text(json.dumps(notebook))
    pages = book_pages(tmp_path)
    assert pages == [tmp_path / "intro.md", tmp_path / "chapters" / "01.ipynb"]
    assert prose(pages[1]) == "Prose here."
    (tmp_path / "_toc.yml").write_text("root: intro\nchapters:\n  - file: missing\n")
    with pytest.raises(pytest.fail.Exception):
        book_pages(tmp_path)


# --------------------------------------------------------------------------------------------
# The pages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [CLAIMS_PAGE, GLOSSARY_PAGE], ids=lambda p: p.name)
def test_every_ref_points_to_an_existing_target_and_has_a_title(page):
    targets = defined_targets()
    refs = referenced_labels(read(page))
    assert refs, f"{page.name} links to no chapter at all"
    missing = sorted({label for label, _ in refs if label not in targets})
    assert not missing, f"{page.name} links to targets no chapter or page defines: {missing}"
    # A label that precedes a paragraph rather than a heading has no title of its own, and
    # Sphinx warns (and -W fails the build) on a bare {ref} to it; an explicit title always works.
    untitled = sorted({label for label, titled in refs if not titled})
    assert not untitled, f"{page.name} has {{ref}} roles without an explicit title: {untitled}"


@pytest.mark.parametrize("page", [CLAIMS_PAGE, GLOSSARY_PAGE], ids=lambda p: p.name)
def test_every_doc_link_and_citation_exists(page):
    text = read(page)
    for match in DOC.finditer(text):
        path = (page.parent / match["path"].strip()).resolve()
        assert path.with_suffix(".ipynb").is_file() or path.with_suffix(".md").is_file(), (
            f"{page.name}: {{doc}} link to {match['path']!r}, which is neither a notebook nor a page"
        )
    known = set(BIB_KEY.findall((ROOT / "references.bib").read_text(encoding="utf-8")))
    cited = {key.strip() for match in CITE.finditer(text) for key in match["keys"].split(",")}
    assert cited <= known, f"{page.name} cites keys missing from references.bib: {sorted(cited - known)}"


def test_claims_page_has_a_row_with_a_verdict_and_a_source_for_every_required_claim():
    rows = claims_table_rows(read(CLAIMS_PAGE))
    ids = [cells[0].strip("`") for cells in rows]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicated, f"claims.md lists these ids twice: {duplicated}"
    missing = sorted(set(REQUIRED_CLAIMS) - set(ids))
    assert not missing, f"claims.md has no row for: {missing}"
    for cells in rows:
        assert len(cells) == 5, f"claims.md row {cells[0]!r} should have 5 cells (id, claim, source, verdict, settled by)"
        claim_id, _claim, source, verdict, settled_by = cells
        document = claim_id.strip("`").split("-")[0]
        if re.fullmatch(r"\d{3}", document):  # ids of seed claims start with the document number
            assert document in source, f"claims.md row {claim_id}: the source column should name document {document}"
        assert verdict.strip().strip("*").strip().lower() in VERDICTS, (
            f"claims.md row {claim_id}: verdict {verdict!r} is not exactly one of {sorted(VERDICTS)}"
        )
        assert re.search(r"\{(ref|doc|cite)\}", settled_by), (
            f"claims.md row {claim_id}: link the chapter cell ({{ref}}), the chapter ({{doc}}) or a paper ({{cite}})"
        )


def test_every_claims_row_has_one_verdict_and_links_its_chapter_section():
    targets = defined_targets()
    problems = {
        cells[0]: found
        for cells in claims_table_rows(read(CLAIMS_PAGE))
        if (found := claim_row_problems(cells, targets))
    }
    assert not problems, f"claims.md rows with problems: {problems}"


def test_claims_page_defines_every_verdict_of_the_scale():
    text = read(CLAIMS_PAGE)
    undefined = sorted(v for v in VERDICTS if not re.search(rf"^- \*\*{v}\*\*:", text, re.MULTILINE | re.IGNORECASE))
    assert not undefined, f"claims.md does not define these verdicts in its list of the scale: {undefined}"


def test_claims_page_links_each_claim_that_a_chapter_settles():
    targets = defined_targets()
    rows = {cells[0].strip("`"): cells for cells in claims_table_rows(read(CLAIMS_PAGE))}
    for label in sorted(t for t in targets if t.startswith("claim-")):
        claim_id = label.removeprefix("claim-")
        assert claim_id in rows, f"{targets[label]} settles {label}, but claims.md has no row {claim_id}"
        linked = {ref_label(m["body"])[0] for m in REF.finditer(rows[claim_id][4])}
        assert label in linked, f"claims.md row {claim_id} should link {{ref}} to {label} in {targets[label]}"


def glossary_entries(text: str) -> dict[str, str]:
    """A MyST definition list as {term: definition}: a term line, then lines starting with ": "."""
    entries: dict[str, str] = {}
    term = None
    for line in text.splitlines():
        if line.startswith(": ") and term is not None:
            entries[term] = line[2:]
        elif line.startswith("  ") and term in entries:
            entries[term] += " " + line.strip()
        elif line.strip() and not line.startswith((" ", "#", ":")):
            term = line.strip()
        else:
            term = None if not line.strip() and term not in entries else term
    return entries


def test_glossary_entries_reads_a_definition_list():
    text = "# Title\n\nIntro.\n\nterm one\n: Sources: 甲 (001).\n  Defined.\n\nterm two\n: Not in the sources.\n"
    assert glossary_entries(text) == {"term one": "Sources: 甲 (001). Defined.", "term two": "Not in the sources."}


def test_every_glossary_entry_names_its_chinese_source_terms_and_links_the_book():
    entries = glossary_entries(read(GLOSSARY_PAGE))
    assert len(entries) >= 20, f"glossary.md should define the book's terms; found only {sorted(entries)}"
    for term, definition in entries.items():
        assert definition.startswith(("Sources:", "Not in the sources")), (
            f"glossary.md, {term!r}: start with the Chinese terms of the sources ('Sources: ...') "
            f"or say 'Not in the sources'"
        )
        if definition.startswith("Sources:"):
            assert re.search(r"[\u4e00-\u9fff]|in English", definition), (
                f"glossary.md, {term!r}: name the sources' Chinese term (or the English word they use)"
            )
        assert re.search(r"\{(ref|doc)\}", definition), f"glossary.md, {term!r}: link where the book explains it"


def test_glossary_links_every_term_that_a_chapter_defines():
    targets = defined_targets()
    linked = {label for label, _ in referenced_labels(read(GLOSSARY_PAGE))}
    unlisted = sorted(t for t in targets if t.startswith("term-") and t not in linked)
    assert not unlisted, f"terms defined in the chapters but missing from glossary.md: {unlisted}"


def test_glossary_names_the_source_documents_terms():
    missing = [term for term in SOURCE_TERMS if term not in read(GLOSSARY_PAGE)]
    assert not missing, f"glossary.md does not mention these terms of the source documents: {missing}"


def test_every_reference_is_cited_in_the_book():
    bib = (ROOT / "references.bib").read_text(encoding="utf-8")
    uncited = uncited_keys(bib, [prose(page) for page in book_pages()])
    assert not uncited, f"references.bib entries that no page of the book cites (cite them or remove them): {uncited}"


def test_glossary_is_in_alphabetical_order():
    terms = list(glossary_entries(read(GLOSSARY_PAGE)))
    problems = glossary_order_problems(terms)
    assert not problems, f"glossary.md is not in alphabetical order (by the English term, ignoring case): {problems}"


@pytest.mark.parametrize("page", book_pages(), ids=lambda p: p.name)
def test_book_text_tells_no_story_of_how_it_was_made(page):
    found = lab_log_phrases_in(prose(page))
    assert not found, (
        f"{page.relative_to(ROOT)}: the text should teach, not log how the book was made; "
        f"rewrite the passages with {found}"
    )
