"""`python -m pgolf.check`: a shim. The command lives in pgolf.parent.check; like everything the worker never
runs, it sits under pgolf.parent, and this shim, which imports from there, never ships either
(docs/architecture.md#what-ships)."""

import sys

from pgolf.parent.check import main

if __name__ == "__main__":
    sys.exit(main())
