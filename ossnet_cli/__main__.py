"""``python -m ossnet_cli``: the ``ossnet`` command (what jobs submitted to a Ray cluster run)."""

import sys

from ossnet_cli import main

sys.exit(main())
