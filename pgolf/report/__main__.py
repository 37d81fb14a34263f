"""`python -m pgolf.report`: a shim for pgolf.parent.report.__main__ (see pgolf/report/__init__.py)."""

import sys

from pgolf.parent.report.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
