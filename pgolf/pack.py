"""`python -m pgolf.pack <run_dir>`: a shim. The packer lives in pgolf.parent.pack and its CLI in
pgolf.parent.submission; like everything the worker never runs, they sit under pgolf.parent, and
this shim, which imports from there, never ships either (docs/architecture.md#what-ships)."""

import sys

from pgolf.parent.submission import main

if __name__ == "__main__":
    sys.exit(main())
