"""The website as a reader sees it: the built book, served on localhost, opened in headless Chromium.

The test builds the HTML exactly as ``make book`` does, then checks every page for what a reader
would notice: JavaScript errors, files that fail to load, requests that leave the machine (the
site must work offline, so MathJax is served locally), missing figures, unrendered math, a
chapter missing from the sidebar, a search that finds nothing, and launch buttons that open the
wrong notebook. It leaves screenshots of two pages in ``_build/screenshots/``.

It drives the system's Chromium through Playwright (no browser download). Without Chromium the
test is skipped with instructions, except under CI (``CI=true``), where a missing browser fails.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
INSTALL_HINT = (
    "The browser test needs Chromium: on Debian/Ubuntu `sudo apt-get install chromium` "
    "(or set NORMLIB_CHROMIUM to a Chromium/Chrome executable)."
)
# A term that only the chapters' text explains, for the search check, and where it must lead.
SEARCH_TERM, SEARCH_MUST_FIND = "covariate", "chapters/01_why_normalize.html"


def _chromium() -> str | None:
    explicit = os.environ.get("NORMLIB_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} Under CI the browser test must run, never skip. {INSTALL_HINT}")
    pytest.skip(f"{reason} {INSTALL_HINT}")


def _toc_files() -> list[str]:
    """Every document of the table of contents, in reading order, without extension."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))
            walk(entry.get("chapters", []))

    walk(toc.get("parts", []))
    walk(toc.get("chapters", []))
    return files


def _image_outputs(notebook: Path) -> int:
    cells = json.loads(notebook.read_text())["cells"]
    return sum(
        1
        for cell in cells
        if cell["cell_type"] == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )


@pytest.fixture(scope="module")
def site() -> str:
    """Build the book, serve it on a free localhost port, and return its base URL."""
    chromium = _chromium()
    if chromium is None:
        _missing("No Chromium found.")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("The Python package playwright is not installed (pip install -r requirements.txt).")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    build = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "-W", "-n", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, f"the book did not build cleanly:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the test reports failures itself
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(HTML)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield browser
        browser.close()


class PageVisit:
    """Opens one page and records what went wrong while it loaded."""

    def __init__(self, browser, site: str, path: str):
        self.site = site
        self.console_errors: list[str] = []
        self.failed: list[str] = []
        self.external: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("request", self._on_request)
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.url} (HTTP {r.status})"))
        self.page.goto(f"{site}/{path}", wait_until="networkidle")
        if self.page.locator(".math").count():
            # MathJax typesets asynchronously; its startup promise settles when the page is done.
            self.page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
            self.page.evaluate("() => MathJax.startup.promise")

    def _on_request(self, request) -> None:
        if not request.url.startswith(self.site) and urlparse(request.url).scheme in ("http", "https"):
            self.external.append(request.url)


@pytest.mark.timeout(1800)
def test_every_page_loads_cleanly_with_figures_and_math(browser, site):
    problems = []
    for name in _toc_files():
        visit = PageVisit(browser, site, f"{name}.html")
        page = visit.page
        for kind, found in (("console errors", visit.console_errors), ("failed requests", visit.failed),
                            ("requests leaving the machine", visit.external)):
            if found:
                problems.append(f"{name}: {kind}: {found}")
        images = page.locator("article img").evaluate_all(
            "els => els.map(e => ({src: e.getAttribute('src'), width: e.naturalWidth}))"
        )
        broken = [image["src"] for image in images if image["width"] == 0]
        if broken:
            problems.append(f"{name}: empty or missing images: {broken}")
        notebook = ROOT / f"{name}.ipynb"
        if notebook.exists():
            expected = _image_outputs(notebook)
            shown = page.locator("article .cell_output img").count()
            if shown != expected:
                problems.append(f"{name}: the notebook has {expected} figures, the page shows {shown}")
        math = page.locator("article .math").count()
        typeset = page.locator("article .math mjx-container").count()
        if typeset != math:
            problems.append(f"{name}: {math - typeset} of {math} math elements were not rendered by MathJax")
        page.close()
    assert not problems, "\n".join(problems)


def test_sidebar_lists_every_chapter(browser, site):
    visit = PageVisit(browser, site, "intro.html")
    links = visit.page.locator("nav.bd-docs-nav a").evaluate_all("els => els.map(e => e.href)")
    listed = {urlparse(link).path.lstrip("/") for link in links}
    expected = {f"{name}.html" for name in _toc_files()[1:]}
    expected |= {f"chapters/{path.stem}.html" for path in (ROOT / "chapters").glob("*.ipynb")}
    missing = sorted(expected - listed)
    assert not missing, f"the sidebar does not list: {missing}"
    visit.page.close()


def test_search_finds_a_term_from_a_chapter(browser, site):
    visit = PageVisit(browser, site, f"search.html?q={SEARCH_TERM}")
    results = visit.page.locator("#search-results ul.search li a")
    results.first.wait_for(timeout=20_000)
    hrefs = results.evaluate_all("els => els.map(e => e.href)")
    assert any(SEARCH_MUST_FIND in href for href in hrefs), f"searching {SEARCH_TERM!r} found only {hrefs}"
    visit.page.close()


def test_launch_buttons_open_this_repository_notebook(browser, site):
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    owner_repo = urlparse(config["repository"]["url"]).path.strip("/")
    branch = config["repository"].get("branch", "main")
    binder = config["launch_buttons"]["binderhub_url"].rstrip("/")
    colab = config["launch_buttons"]["colab_url"].rstrip("/")
    notebooks = sorted((ROOT / "chapters").glob("*.ipynb"))
    assert notebooks, "no chapter notebooks found"
    for notebook in notebooks:
        path = notebook.relative_to(ROOT).as_posix()
        visit = PageVisit(browser, site, path.replace(".ipynb", ".html"))
        hrefs = visit.page.locator("a").evaluate_all("els => els.map(e => e.href)")
        expected = {
            "Binder": f"{binder}/v2/gh/{owner_repo}/{branch}?urlpath=tree/{path}",
            "Colab": f"{colab}/github/{owner_repo}/blob/{branch}/{path}",
        }
        for service, url in expected.items():
            assert url in hrefs, f"{path}: no {service} launch link {url}; links found: {[h for h in hrefs if service.lower() in h]}"
        visit.page.close()


def test_every_page_footer_names_the_licenses_and_the_build(browser, site):
    for name in ("intro", "chapters/05_rms_norm"):
        visit = PageVisit(browser, site, f"{name}.html")
        footer = visit.page.locator("footer .site-license")
        assert footer.count() == 1, f"{name}: no license line in the footer"
        text = footer.inner_text()
        assert "CC BY 4.0" in text and "MIT" in text and "commit" in text, f"{name}: footer says {text!r}"
        visit.page.close()


def test_screenshots_of_intro_and_a_chapter(browser, site):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, path in (("intro", "intro.html"), ("chapter", "chapters/02_batch_norm.html")):
        visit = PageVisit(browser, site, path)
        target = SCREENSHOTS / f"{name}.png"
        visit.page.screenshot(path=str(target), full_page=False)
        assert target.stat().st_size > 10_000, f"{target} is suspiciously small"
        visit.page.close()
