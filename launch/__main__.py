"""`python -m launch ...` is `python -m launch.submit ...`."""

import sys

from cxrbase.errors import cli_entry
from launch.submit import main

sys.exit(cli_entry(main)())
