"""``python -m dashcar.cli``: the ``dashcar`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
