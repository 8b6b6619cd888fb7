"""`python -m launch ...` is `python -m launch.submit ...`."""
import sys

from launch.submit import main
from cxrbase.errors import cli_entry

sys.exit(cli_entry(main)())
