"""`python -m pipeline ...`: see pipeline.cli."""

import sys

from pipeline.cli import run

sys.exit(run())
