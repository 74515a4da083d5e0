"""A Sphinx extension that puts the licenses and the exact source of the build in every page's footer.

A reader who copies a figure needs to know its license, and a reader who finds a mistake needs to
know which version of the course they read. The footer names both licenses (CC BY 4.0 for the text
and figures, MIT for the code; see LICENSE-TEXT.md and LICENSE), normlib's version and the commit the
site was built from. The version is read from ``normlib/__init__.py`` as text, so building the book
never imports torch; the commit comes from git, or from ``$NORMLIB_BUILD_COMMIT`` where the site is
built outside a clone, and is "unknown" where neither exists.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError

ROOT = Path(__file__).resolve().parent.parent
VERSION_LINE = re.compile(r'^__version__\s*=\s*"([^"]+)"', re.MULTILINE)


def normlib_version(root: Path = ROOT) -> str:
    text = (root / "normlib" / "__init__.py").read_text(encoding="utf-8")
    match = VERSION_LINE.search(text)
    if match is None:
        raise ExtensionError('normlib/__init__.py has no line __version__ = "..."')
    return match.group(1)


def build_commit(root: Path = ROOT) -> str:
    if os.environ.get("NORMLIB_BUILD_COMMIT"):
        return os.environ["NORMLIB_BUILD_COMMIT"][:12]
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def footer_html(repository_url: str, branch: str, version: str, commit: str) -> str:
    url = html.escape(repository_url.rstrip("/"), quote=True)
    commit_text = html.escape(commit)
    if commit != "unknown" and url:
        commit_text = f'<a href="{url}/commit/{commit_text}">{commit_text}</a>'
    return (
        '<p class="site-license">'
        'Text and figures: <a href="https://creativecommons.org/licenses/by/4.0/">CC BY 4.0</a>. '
        f'Code (normlib and the notebooks\' code cells): <a href="{url}/blob/{html.escape(branch, quote=True)}/LICENSE">MIT</a>. '
        f"Built from normlib {html.escape(version)}, commit {commit_text}."
        "</p>"
    )


def _set_footer(app: Sphinx, config: Config) -> None:
    options = dict(config.html_theme_options or {})
    repository_url = options.get("repository_url", "")
    branch = options.get("repository_branch") or "main"
    options["extra_footer"] = footer_html(repository_url, branch, normlib_version(), build_commit())
    config.html_theme_options = options


def setup(app: Sphinx) -> dict:
    # after Jupyter Book has filled html_theme_options from _config.yml (repository_url among them)
    app.connect("config-inited", _set_footer, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
