"""A Sphinx extension that makes the built site work offline and load without script errors.

1. MathJax from the site, not a CDN. Jupyter Book's default loads MathJax from a CDN, so the math
   of an offline copy of the site (and of the browser test, which runs without network) would
   stay raw TeX. This copies MathJax 3's ``es5`` bundle, which the PyPI package
   ``django-static-mathjax`` ships as plain files (no Django needed), into ``_static/mathjax`` of
   the HTML output and points Sphinx's ``mathjax_path`` at it.
2. One copy of each inline script. sphinx-thebe 0.3.1 registers its configuration script once
   per read phase; with Jupyter Book 1.0.4 that is twice, and the second ``const THEBE_JS_URL``
   throws "Identifier has already been declared" on every page. Duplicates are dropped when a
   page is written.

``_config.yml`` enables it under ``sphinx: local_extensions``; it lives outside normlib so that
building the book never imports torch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError

# Relative to the HTML output's _static folder, as Sphinx reads a relative mathjax_path.
MATHJAX_ENTRY = "mathjax/tex-chtml.js"


def mathjax_bundle() -> Path:
    """The folder holding MathJax's ``tex-chtml.js`` and the fonts and components it loads."""
    try:
        import mathjax  # the module that django-static-mathjax installs
    except ImportError as error:
        raise ExtensionError(
            "the offline_site extension needs the package django-static-mathjax "
            "(pip install -r requirements.txt)"
        ) from error
    bundle = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (bundle / "tex-chtml.js").is_file():
        raise ExtensionError(f"no MathJax es5 bundle at {bundle}: reinstall django-static-mathjax")
    return bundle


def _point_at_local_copy(app: Sphinx, config: Config) -> None:
    config.mathjax_path = MATHJAX_ENTRY


def _copy_bundle(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(mathjax_bundle(), target, dirs_exist_ok=True)


def _drop_duplicate_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen = set()
    unique = []
    for script in scripts:
        # An inline script is registered once with filename None and once with "": same script.
        key = (script.filename or None, script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def setup(app: Sphinx) -> dict:
    mathjax_bundle()  # fail at start-up, not after a whole build, when the package is missing
    app.connect("config-inited", _point_at_local_copy, priority=900)
    app.connect("build-finished", _copy_bundle)
    app.connect("html-page-context", _drop_duplicate_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
