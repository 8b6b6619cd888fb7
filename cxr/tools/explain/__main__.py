"""`python -m cxr.tools.explain` (see cxr.tools.explain)."""

import sys

from cxr.tools.explain.cli import main

if __name__ == "__main__":
    sys.exit(main())
