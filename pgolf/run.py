"""`python -m pgolf.run`: a shim. The command lives in pgolf.parent.run; like everything the worker never
runs, it sits under pgolf.parent, and this shim, which imports from there, never ships either
(docs/architecture.md#what-ships)."""

from pgolf.parent.run import main

if __name__ == "__main__":
    main()
