"""A Sphinx extension that lays the site out for narrow screens: equations and tables on a phone.

1. Display equations. A display equation wider than the text column scrolls sideways inside its
   own box; it is never clipped and never widens the page. The theme makes the equation box a
   flex row (equation, then its number), where a flex item does not shrink below its content
   unless told to (``min-width: 0``).
2. Tables. On a phone a table with a header row is shown one row at a time, each cell under the
   name of its column, instead of a grid whose right-hand columns sit off-screen (the claims page
   has five columns). ``site_layout.js`` copies each column's header into its cells as
   ``data-label`` and marks the table; without JavaScript the table keeps its sideways scrollbar.

The files live in ``_ext/static`` and are copied into the site's ``_static`` folder.
``_config.yml`` enables the extension under ``sphinx: local_extensions``.
"""

from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

STATIC = Path(__file__).resolve().parent / "static"
CSS, JS = "site_layout.css", "site_layout.js"


def _add_static_path(app: Sphinx, config: Config) -> None:
    if str(STATIC) not in config.html_static_path:
        config.html_static_path.append(str(STATIC))


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _add_static_path)
    # priority 900: after the theme's own stylesheets, so these rules win ties
    app.add_css_file(CSS, priority=900)
    app.add_js_file(JS, priority=900, loading_method="defer")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
