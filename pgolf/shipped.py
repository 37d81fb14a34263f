"""The code a run ships, written next to its model: the packer's wrapper, or the running one.

A run started from source builds `train_gpt.py` with `pgolf.pack` (imported only then, so it is
never shipped). A run of a packed `train_gpt.py` already is that file: it copies itself, and the
code bytes are the size of the file that ran, whatever the packer would make of it today.
"""

from __future__ import annotations

from pathlib import Path

from pgolf.results import write_text_atomic

# Set by `pgolf.train.run_packed`: the self-extracting script this process runs from.
PACKED_SCRIPT: Path | None = None


def write_code(path: Path, config: dict) -> tuple[int, int]:
    """Write the run's `train_gpt.py` to `path`; return (its bytes on disk, raw bytes of the source
    it carries: the original files from source, the extracted minified files when packed)."""
    if PACKED_SCRIPT is None:
        # Never runs in a packed script, but this line ships: of the ways to name the packer, this
        # one costs the fewest code bytes (43,020 for the offline default against 43,038).
        from pgolf.parent import pack

        return pack.write_wrapper(path, config)
    write_text_atomic(path, PACKED_SCRIPT.read_bytes())
    extracted = Path(__file__).resolve().parent.parent  # the wrapper's temp dir
    raw = sum(p.stat().st_size for p in extracted.rglob("*.py"))
    return path.stat().st_size, raw
