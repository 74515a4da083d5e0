"""``python -m normlib.bench``: see :mod:`normlib.bench.cli`."""

import sys

from normlib.bench.cli import main

sys.exit(main())
