"""The website as a reader sees it: the built book, served on localhost, opened in headless Chromium.

The test builds the HTML exactly as ``make book`` does, then checks every page for what a reader
would notice: JavaScript errors, files that fail to load, requests that leave the machine (the
site must work offline, so MathJax is served locally), missing figures, unrendered math, a
chapter missing from the sidebar, a search that finds nothing, and launch buttons that open the
wrong notebook. Then it opens every page again at three widths, phone (390 px), tablet (800 px) and
desktop (1400 px), as one sweep whose findings the layout tests below read: the sidebar toggles
open the chapter list and the page contents, each page has one header, a wide display equation on
a phone scrolls inside its box instead of being clipped, and on the desktop every display equation
fits its box, code blocks rarely need sideways scrolling, and figures are shown near the size they
were drawn at, with alt text. Screenshots of every page at the three widths
land in ``_build/screenshots/``.

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


# --- The layout at three widths ------------------------------------------------------------------

# The widths a reader opens the site at: a phone, a tablet, a desktop (the desktop is where the
# equations, code and figures are measured: the theme's text column is widest there).
WIDTHS = (390, 800, 1400)
DESKTOP, PHONE = 1400, 390
VIEWPORT_HEIGHT = 900
# The share of a page's code blocks (cell inputs, cell outputs, code in the text) that may need
# sideways scrolling on the desktop. A few percent leaves room for the odd line that cannot be
# broken (a long URL), not for a chapter formatted wider than its column.
MAX_SCROLLING_CODE_SHARE = 0.05
# A figure shown below this fraction of the width it was drawn at has had its labels shrunk with
# it below readability; figures are drawn for the text column instead (normlib/book/plots.py).
MIN_FIGURE_SCALE = 0.7
# The theme's sidebars slide in and out; how long a toggled sidebar may take to settle.
TOGGLE_TIMEOUT_MS = 3_000

CHAPTER_LIST = ".bd-sidebar-primary nav.bd-docs-nav a"
PAGE_CONTENTS = ".bd-sidebar-secondary nav.page-toc a"
PRIMARY_TOGGLE = "button.primary-toggle:visible"
SECONDARY_TOGGLE = "button.secondary-toggle:visible"

# True when some element matching the selector is rendered, not transparent, and lies across the
# window horizontally (a closed sidebar is parked off-screen, so "visible" alone says nothing).
ON_SCREEN_JS = """selector => [...document.querySelectorAll(selector)].some(e => {
  const r = e.getBoundingClientRect();
  return r.width > 0 && r.height > 0 && r.left >= -1 && r.right <= window.innerWidth + 1
    && e.checkVisibility({opacityProperty: true, visibilityProperty: true,
                          checkOpacity: true, checkVisibilityCSS: true});
})"""

# Header bars on screen: the theme's site header and the article's header (the button row).
HEADERS_JS = """() => [...document.querySelectorAll('header.bd-header, .bd-header-article')]
  .filter(e => { const r = e.getBoundingClientRect();
                 return r.width > 0 && r.height > 0
                   && e.checkVisibility({visibilityProperty: true, checkVisibilityCSS: true}); })
  .map(e => (e.tagName.toLowerCase() + '.' + [...e.classList].join('.')))"""

# Every display equation: its number, the start of its TeX, the width it needs and the width of
# its box (the box's own width less the equation number), and how far it reaches past the box.
EQUATIONS_JS = """() => [...document.querySelectorAll('article div.math')].map((box, index) => {
  const container = box.querySelector('mjx-container');
  const number = box.querySelector('span.eqno');
  let tex = '';
  try { const items = MathJax.startup.document.getMathItemsWithin(box); if (items.length) tex = items[0].math; }
  catch (error) { tex = box.textContent; }
  const outer = box.getBoundingClientRect();
  return {index, number: number ? number.textContent.replace(/#/g, '').trim() : null,
          tex: tex.trim().replace(/\\s+/g, ' ').slice(0, 60), column: Math.round(outer.width),
          box: container ? container.clientWidth : 0, width: container ? container.scrollWidth : 0,
          past: container ? Math.round(container.getBoundingClientRect().right - outer.right) : 0,
          scrolls: container ? ['auto', 'scroll'].includes(getComputedStyle(container).overflowX) : false};
})"""

# Every code block: which notebook cell it belongs to (by order among the page's cells), input or
# output, the width its text needs, the width it is shown in, and how far it reaches past the column.
CODE_JS = """() => {
  const article = document.querySelector('article.bd-article');
  const style = getComputedStyle(article);
  const right = article.getBoundingClientRect().right - parseFloat(style.paddingRight);
  const cells = [...article.querySelectorAll('div.cell')];
  let loose = 0;
  return [...article.querySelectorAll('pre')].map(pre => {
    const cell = pre.closest('div.cell');
    return {cell: cell ? cells.indexOf(cell) : null, block: cell ? null : loose++,
            part: pre.closest('.cell_output') ? 'output' : 'input',
            width: pre.scrollWidth, box: pre.clientWidth,
            past: Math.round(pre.getBoundingClientRect().right - right),
            line: pre.textContent.split('\\n')[0].slice(0, 50)};
  });
}"""

# Every image in the text: the cell it belongs to, its file, alt text, drawn and shown width.
FIGURES_JS = """() => {
  const cells = [...document.querySelectorAll('article div.cell')];
  return [...document.querySelectorAll('article img')].map((img, index) => {
    const cell = img.closest('div.cell');
    return {index, cell: cell ? cells.indexOf(cell) : null, src: img.getAttribute('src') || '',
            alt: img.getAttribute('alt'), drawn: img.naturalWidth,
            shown: Math.round(img.getBoundingClientRect().width)};
  });
}"""


def _open(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    if page.locator(".math").count():
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
        page.evaluate("() => MathJax.startup.promise")


def _settles(page, selector: str, on_screen: bool) -> bool:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    test = ON_SCREEN_JS if on_screen else f"selector => !({ON_SCREEN_JS})(selector)"
    try:
        page.wait_for_function(test, arg=selector, timeout=TOGGLE_TIMEOUT_MS)
    except PlaywrightTimeout:
        return False
    return True


def _navigation_problems(page, url: str, screenshot: str | None = None) -> list[str]:
    """Open the chapter list and the page contents with the toggles a reader sees.

    With ``screenshot`` (a path without suffix), each opened sidebar is photographed as well.
    """
    problems = []
    for what, toggle, target in (("chapter list", PRIMARY_TOGGLE, CHAPTER_LIST),
                                 ("page contents", SECONDARY_TOGGLE, PAGE_CONTENTS)):
        if what == "page contents" and page.locator(target).count() == 0:
            continue  # a page without sections has no page contents
        buttons = page.locator(toggle)
        if page.evaluate(ON_SCREEN_JS, target):
            # Shown beside the text (the desktop): its toggle, if any, must hide and show it again.
            if buttons.count():
                buttons.first.click()
                if not _settles(page, target, on_screen=False):
                    problems.append(f"its toggle does not hide the {what}")
                buttons.first.click()
                if not _settles(page, target, on_screen=True):
                    problems.append(f"its toggle hides the {what} and does not show it again")
            continue
        if buttons.count() == 0:
            problems.append(f"the {what} is off-screen and no toggle for it is visible")
            continue
        buttons.first.click()
        if not _settles(page, target, on_screen=True):
            problems.append(f"clicking the {what} toggle does not bring the {what} on screen")
        elif screenshot:
            page.screenshot(path=f"{screenshot}-{what.replace(' ', '-')}.png")
        page.keyboard.press("Escape")
        if not _settles(page, target, on_screen=False):
            _open(page, url)  # start the next check from a closed sidebar
    return problems


def _notebook_cells(name: str) -> list[int] | None:
    """For a chapter, the notebook index of each code cell the page shows, in page order."""
    notebook = ROOT / f"{name}.ipynb"
    if not notebook.exists():
        return None
    cells = json.loads(notebook.read_text())["cells"]
    return [
        index
        for index, cell in enumerate(cells)
        if cell["cell_type"] == "code" and "remove-cell" not in cell.get("metadata", {}).get("tags", [])
    ]


def _cell_name(cells: list[int] | None, position: int | None, loose: int | None = None) -> str:
    if position is None:
        return f"code block {loose} of the text"
    if cells is not None and position < len(cells):
        return f"cell {cells[position]} of the notebook (code cell {position})"
    return f"code cell {position}"


def _path_like(alt: str | None, src: str) -> bool:
    text = (alt or "").strip()
    if not text:
        return True
    stem = src.rsplit("/", 1)[-1]
    pictures = (".png", ".jpg", ".jpeg", ".svg", ".gif")
    return text == src or text.rsplit("/", 1)[-1] == stem or text.lower().endswith(pictures)


@pytest.fixture(scope="module")
def layout(browser, site) -> dict:
    """Every page at every width, opened once in one reused tab per width; what the tests judge.

    Returns {"navigation", "headers"}: problems as text; {"equations", "code", "figures"}: the
    desktop measurements and {"phone equations"}, as (page, list of dicts) pairs; {"screenshots"}: the files written. It
    leaves a screenshot of the top of every page at every width in _build/screenshots/ (and of
    the front page with each sidebar opened where a toggle opens it).
    """
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    found = {"navigation": [], "headers": [], "equations": [], "phone equations": [], "code": [], "figures": [],
             "screenshots": []}
    for width in WIDTHS:
        page = browser.new_page(viewport={"width": width, "height": VIEWPORT_HEIGHT})
        for name in _toc_files():
            url = f"{site}/{name}.html"
            _open(page, url)
            target = SCREENSHOTS / f"{name.replace('/', '-')}-{width}.png"
            page.screenshot(path=str(target))
            found["screenshots"].append(target)
            headers = page.evaluate(HEADERS_JS)
            if len(headers) != 1:
                found["headers"].append(f"{name} at {width} px: {len(headers)} header bars on screen: {headers}")
            if width == PHONE:
                found["phone equations"].append((name, page.evaluate(EQUATIONS_JS)))
            if width == DESKTOP:
                found["equations"].append((name, page.evaluate(EQUATIONS_JS)))
                found["code"].append((name, page.evaluate(CODE_JS)))
                found["figures"].append((name, page.evaluate(FIGURES_JS)))
            # last, since a toggled sidebar changes the layout measured above
            shot = str(SCREENSHOTS / f"{name}-{width}") if name == _toc_files()[0] else None
            found["navigation"] += [f"{name} at {width} px: {p}" for p in _navigation_problems(page, url, shot)]
        page.close()
    return found


def test_toggles_open_the_chapter_list_and_page_contents_at_every_width(layout):
    assert not layout["navigation"], "\n".join(layout["navigation"])


def test_every_page_has_one_header(layout):
    assert not layout["headers"], "\n".join(layout["headers"])


def _equation_label(eq: dict) -> str:
    return f"equation {eq['number']}" if eq["number"] else f"unnumbered equation {eq['index']} on the page"


def test_display_equations_fit_their_box_on_the_desktop(layout):
    problems = []
    for name, equations in layout["equations"]:
        for eq in equations:
            label = _equation_label(eq)
            if eq["width"] > eq["box"] + 1 or eq["past"] > 1:
                problems.append(
                    f"{name}: {label} ({eq['tex']}...) is {eq['width']} px wide in a {eq['box']} px box "
                    f"(column {eq['column']} px, reaches {max(eq['past'], 0)} px past it)"
                )
    heading = f"{len(problems)} display equations wider than their box at {DESKTOP} px:"
    assert not problems, "\n".join([heading, *problems])


def test_display_equations_scroll_and_are_never_clipped_on_a_phone(layout):
    problems = []
    for name, equations in layout["phone equations"]:
        for eq in equations:
            label = _equation_label(eq)
            if eq["past"] > 1 or (eq["width"] > eq["box"] + 1 and not eq["scrolls"]):
                problems.append(
                    f"{name}: {label} ({eq['tex']}...) is {eq['width']} px wide in a {eq['box']} px box that "
                    f"{'scrolls' if eq['scrolls'] else 'does not scroll'}, reaching {eq['past']} px past the column"
                )
    heading = f"display equations clipped at {PHONE} px:"
    assert not problems, "\n".join([heading, *problems])


def test_code_blocks_fit_the_desktop_column(layout):
    problems = []
    for name, blocks in layout["code"]:
        cells = _notebook_cells(name)
        scrolling = [b for b in blocks if b["width"] > b["box"] + 1 or b["past"] > 1]
        if blocks and len(scrolling) / len(blocks) > MAX_SCROLLING_CODE_SHARE:
            lines = [
                f"  {_cell_name(cells, b['cell'], b['block'])} {b['part']}: {b['width']} px of text in a "
                f"{b['box']} px box ({b['line']!r})"
                for b in scrolling
            ]
            problems.append(
                f"{name}: {len(scrolling)} of {len(blocks)} code blocks need sideways scrolling at {DESKTOP} px "
                f"(at most {MAX_SCROLLING_CODE_SHARE:.0%} may):\n" + "\n".join(lines)
            )
    assert not problems, "\n".join(problems)


def test_figures_are_shown_near_their_drawn_size_with_alt_text(layout):
    problems = []
    for name, figures in layout["figures"]:
        cells = _notebook_cells(name)
        for fig in figures:
            if fig["drawn"] == 0:
                continue  # a missing image; test_every_page_loads_cleanly_with_figures_and_math reports it
            label = f"figure {fig['index']}"
            if fig["cell"] is not None:
                label += f" ({_cell_name(cells, fig['cell'])})"
            if fig["shown"] < MIN_FIGURE_SCALE * fig["drawn"]:
                problems.append(
                    f"{name}: {label} is drawn {fig['drawn']} px wide and shown at {fig['shown']} px "
                    f"({fig['shown'] / fig['drawn']:.0%}, at least {MIN_FIGURE_SCALE:.0%} required)"
                )
            if _path_like(fig["alt"], fig["src"]):
                problems.append(f"{name}: {label} has no alt text but {fig['alt']!r} ({fig['src']})")
    assert not problems, f"at {DESKTOP} px:\n" + "\n".join(problems)


def test_screenshots_of_every_page_at_three_widths(layout):
    expected = len(_toc_files()) * len(WIDTHS)
    assert len(layout["screenshots"]) == expected
    small = [str(path) for path in layout["screenshots"] if path.stat().st_size < 10_000]
    assert not small, f"suspiciously small screenshots: {small}"
