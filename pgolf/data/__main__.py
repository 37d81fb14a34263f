"""`python -m pgolf.data {download,build} ...` (see pgolf/data/cli.py)."""

from pgolf.data.cli import main

if __name__ == "__main__":
    main()
