"""``python -m qsync``: the same as the ``qsync`` command."""

import sys

from .cli import main

sys.exit(main())
