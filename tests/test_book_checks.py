"""The checks that carry the book's experimental verdicts (normlib.book.checks), and the rules that keep
the notebooks comparable on any machine.

The rules, read from the committed notebooks:
- a code cell whose output nbval ignores (tag ``nbval-ignore-output``) is followed by a cell that runs
  a check, before the next section heading, so no result is shown without a verdict that is tested;
- a check cell's own output is compared, and its committed output holds the verdict line;
- every check id is used once in the book and has its MyST target ``(check-<id>)=`` in the same
  notebook, and prose somewhere links to it;
- a claim section that cites a check is mirrored on the claims page, which links the same check.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from normlib.book.checks import (
    CheckFailed,
    check,
    check_all_above,
    check_all_below,
    check_close,
    check_greater,
    spread,
)

ROOT = Path(__file__).resolve().parents[1]
IGNORE_TAG = "nbval-ignore-output"
CHECK_CALL = re.compile(r"\bcheck(?:_[a-z_]+)?\(\s*[\"'](?P<id>[^\"']+)[\"']")
CHECK_TARGET = re.compile(r"^\(check-(?P<id>[a-z0-9-]+)\)=\s*$", re.MULTILINE)
CHECK_REF = re.compile(r"\{ref\}`(?:[^`<]*<)?check-(?P<id>[a-z0-9-]+)>?`")
CLAIM_TARGET = re.compile(r"^\(claim-(?P<id>[a-z0-9-]+)\)=\s*$", re.MULTILINE)
HEADING = re.compile(r"^#{1,3} ", re.MULTILINE)


# --------------------------------------------------------------------------------------------
# The helper
# --------------------------------------------------------------------------------------------


def test_greater_prints_one_line_without_the_measured_digits(capsys):
    check_greater("01-demo", "A beats B", [0.90, 0.92, 0.91], [0.10, 0.12, 0.11], margin=0.5)
    assert capsys.readouterr().out == "[01-demo] A beats B: holds (margin 0.5)\n"


def test_greater_fails_below_the_margin_and_names_the_values():
    with pytest.raises(CheckFailed, match=r"does NOT hold.*0\.6.*0\.2.*margin 0\.5"):
        check_greater("01-demo", "A beats B", [0.6, 0.6, 0.6], [0.2, 0.2, 0.2], margin=0.5, names=("A", "B"))


def test_greater_fails_when_the_gap_is_within_the_spread_whatever_the_margin():
    # means differ by 0.2 > margin 0.1, but the seeds spread by about 0.26 in all
    with pytest.raises(CheckFailed, match="spread"):
        check_greater("01-demo", "A beats B", [0.4, 0.7, 1.0], [0.4, 0.5, 0.6], margin=0.1)


def test_close_within_and_beyond_tolerance(capsys):
    check_close("05-demo", "A matches B", [0.50, 0.52], [0.51, 0.53], tolerance=0.03)
    assert capsys.readouterr().out == "[05-demo] A matches B: holds (within 0.03)\n"
    with pytest.raises(CheckFailed, match=r"\|gap\| 0\.1 > tolerance 0\.03"):
        check_close("05-demo", "A matches B", [0.5], [0.6], tolerance=0.03)


def test_all_above_and_below_look_at_every_run(capsys):
    check_all_above("02-demo", "every run learns", [0.8, 0.9], 0.5)
    check_all_below("02-demo", "every run stays at chance", [0.1, 0.12], 0.2)
    assert capsys.readouterr().out.splitlines() == [
        "[02-demo] every run learns: holds (every run above 0.5)",
        "[02-demo] every run stays at chance: holds (every run below 0.2)",
    ]
    with pytest.raises(CheckFailed, match="smallest 0.4"):
        check_all_above("02-demo", "every run learns", [0.8, 0.4], 0.5)
    with pytest.raises(CheckFailed, match="largest 0.3"):
        check_all_below("02-demo", "every run stays at chance", [0.1, 0.3], 0.2)


def test_general_check(capsys):
    check("04-demo", "the loss falls", True, measured="1.0 -> 0.5", margin="by more than 10%")
    assert capsys.readouterr().out == "[04-demo] the loss falls: holds (by more than 10%)\n"
    with pytest.raises(CheckFailed, match="measured 1.0 -> 0.95"):
        check("04-demo", "the loss falls", False, measured="1.0 -> 0.95", margin="by more than 10%")
    with pytest.raises(TypeError, match="holds must be a bool"):
        check("04-demo", "the loss falls", 1, measured="", margin="")


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: check_greater("lr-range", "c", [1], [0], margin=0.1), "check_id"),
        (lambda: check_greater("01-Bad_Id", "c", [1], [0], margin=0.1), "check_id"),
        (lambda: check_greater("01-ok", "", [1], [0], margin=0.1), "claim"),
        (lambda: check_greater("01-ok", "two\nlines", [1], [0], margin=0.1), "claim"),
        (lambda: check_greater("01-ok", "c", [1], [0], margin=-1), "margin"),
        (lambda: check_greater("01-ok", "c", [], [0], margin=0.1), "larger"),
        (lambda: check_greater("01-ok", "c", [1, float("nan")], [0], margin=0.1), "larger"),
        (lambda: check_close("01-ok", "c", [1], [1], tolerance=float("inf")), "margin"),
    ],
)
def test_bad_arguments_are_named(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_spread_uses_the_sample_standard_deviation():
    s = spread([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n, s.min, s.max) == (2.0, 1.0, 3, 1.0, 3.0)
    assert s.format(1) == "2.0 ± 1.0 (n=3)"
    assert spread([5.0]).std == 0.0


# --------------------------------------------------------------------------------------------
# The notebooks
# --------------------------------------------------------------------------------------------


def notebooks() -> list[Path]:
    return sorted((ROOT / "chapters").glob("*.ipynb"))


def cells_of(path: Path) -> list[dict]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if not isinstance(cell["source"], str):
            cell["source"] = "".join(cell["source"])
    return cells


def output_text(cell: dict) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            text = output["text"]
            parts.append(text if isinstance(text, str) else "".join(text))
        elif "text/plain" in output.get("data", {}):
            text = output["data"]["text/plain"]
            parts.append(text if isinstance(text, str) else "".join(text))
    return "".join(parts)


def check_ids(cell: dict) -> list[str]:
    return CHECK_CALL.findall(cell["source"]) if cell["cell_type"] == "code" else []


def is_ignored(cell: dict) -> bool:
    return IGNORE_TAG in cell.get("metadata", {}).get("tags", [])


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_every_ignored_output_is_followed_by_a_check_in_its_section(path):
    cells = cells_of(path)
    unchecked = []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code" or not is_ignored(cell) or check_ids(cell):
            continue
        for later in cells[i + 1 :]:
            if later["cell_type"] == "markdown" and HEADING.search(later["source"]):
                unchecked.append(i)
                break
            if check_ids(later):
                break
        else:
            unchecked.append(i)
    assert not unchecked, (
        f"{path.name}: cells {unchecked} are tagged {IGNORE_TAG} but no check follows them in their "
        f"section; state the conclusion with normlib.book.checks or compare the output"
    )


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_check_cells_are_compared_and_hold_in_the_committed_outputs(path):
    for i, cell in enumerate(cells_of(path)):
        ids = check_ids(cell)
        if not ids:
            continue
        assert not is_ignored(cell), f"{path.name} cell {i}: a check cell's verdict must be compared; drop {IGNORE_TAG}"
        printed = output_text(cell)
        for check_id in ids:
            assert re.search(rf"^\[{re.escape(check_id)}\] .+: holds \(.+\)$", printed, re.MULTILINE), (
                f"{path.name} cell {i}: the committed output has no verdict line for check {check_id}; "
                f"re-execute the notebook"
            )


def all_check_ids() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in notebooks():
        for cell in cells_of(path):
            for check_id in check_ids(cell):
                found.setdefault(check_id, []).append(path.name)
    return found


def markdown_of(path: Path) -> str:
    return "\n\n".join(c["source"] for c in cells_of(path) if c["cell_type"] == "markdown")


def book_text() -> str:
    pages = [p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("*.md")) if p.name != "README.md"]
    return "\n\n".join(pages + [markdown_of(p) for p in notebooks()])


def test_the_book_has_checks_and_each_id_is_used_once():
    ids = all_check_ids()
    assert ids, "no chapter runs a check from normlib.book.checks"
    repeated = {k: v for k, v in ids.items() if len(v) > 1}
    assert not repeated, f"check ids used more than once: {repeated}"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_every_check_has_its_target_in_its_chapter_and_is_linked_from_prose(path):
    used = {check_id for cell in cells_of(path) for check_id in check_ids(cell)}
    targets = set(CHECK_TARGET.findall(markdown_of(path)))
    assert used == targets, (
        f"{path.name}: checks run without a (check-<id>)= target: {sorted(used - targets)}; "
        f"targets without a check: {sorted(targets - used)}"
    )
    linked = set(CHECK_REF.findall(book_text()))
    unlinked = sorted(used - linked)
    assert not unlinked, f"{path.name}: no prose links to these checks with {{ref}}: {unlinked}"


def test_claims_page_links_the_checks_that_settle_each_claim():
    claims_page = (ROOT / "claims.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in claims_page.splitlines() if line.startswith("| ")}
    missing = []
    for path in notebooks():
        for cell in cells_of(path):
            if cell["cell_type"] != "markdown":
                continue
            for claim_id in CLAIM_TARGET.findall(cell["source"]):
                cited = set(CHECK_REF.findall(cell["source"]))
                on_page = set(CHECK_REF.findall(rows.get(claim_id, "")))
                missing += [f"{claim_id}: check-{c}" for c in sorted(cited - on_page)]
    assert not missing, f"claims.md rows should link the checks their chapter sections cite: {missing}"
