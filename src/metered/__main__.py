"""``python -m metered``: the same as the ``metered`` command."""

import sys

from metered.cli import main

sys.exit(main())
