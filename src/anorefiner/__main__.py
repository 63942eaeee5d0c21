"""``python -m anorefiner`` (what the workflow rules call; works without the console script)."""

import sys

from anorefiner.cli import main

sys.exit(main())
