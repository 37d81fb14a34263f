"""The 2026-04-09 record's initial weights, as its script would build them, saved for `init_from=`.

    python3 bench/r0409_init.py RECORD_SCRIPT OUT.pt     (with the record's env vars set)

The record builds its model on the CPU right after seeding (random, numpy, torch with SEED) and
draws nothing from torch's RNG before that, so importing the script and repeating those steps
gives its exact init without a GPU: the model the record trains from, with the token embedding in
bf16 and everything else fp32 as after its `.bfloat16()` + `restore_fp32_params`. pgolf loads the
file with `init_from=OUT.pt` (pgolf.models.convert), so both sides of bench/models_r0409.sh start
from the same weights. `flash_attn_interface` must be importable (the FA3 shim); attention is not
called here.
"""

from __future__ import annotations

import ast
import base64
import linecache
import lzma
import random
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

# Python < 3.12 cannot parse f-strings that nest the same quotes (PEP 701); the record has two.
PRE_PEP701 = (
    ('{", ".join(', "{', '.join("),
    ('.glob("fineweb_train_*.bin")', ".glob('fineweb_train_*.bin')"),
)


# The records' own files are self-extracting: `exec(L.decompress(B.b85decode(<literal>)))` of their
# code. PR #1532 wraps an .xz stream in a bytes literal; the 2026-04-09 record a raw LZMA2 stream in
# a str literal (`..., format=L.FORMAT_RAW, filters=[{"id": L.FILTER_LZMA2}]`).
WRAPPED = re.compile(
    r"^import lzma as L,\s*base64 as B\s*exec\(L\.decompress\(B\.b85decode\((b?'[^']*'|b?\"[^\"]*\")\)"
    r"(\s*,\s*format=L\.FORMAT_RAW\s*,\s*filters=\[\{\s*[\"']id[\"']\s*:\s*L\.FILTER_LZMA2\s*\}\])?\)\)\s*$"
)
RAW_LZMA2 = [{"id": lzma.FILTER_LZMA2}]


def unwrap(source: str) -> str:
    """The Python a record's lzma/base85 wrapper would exec (its literal is read, never run), else
    `source` as it is."""
    m = WRAPPED.match(source)
    if not m:
        return source
    packed = base64.b85decode(ast.literal_eval(m.group(1)))
    if m.group(2):
        return lzma.decompress(packed, format=lzma.FORMAT_RAW, filters=RAW_LZMA2).decode()
    return lzma.decompress(packed).decode()


def load_record(script: str | Path, name: str = "r0409_record") -> ModuleType:
    """Import the record script as a module (its Hyperparameters read the environment now); a
    wrapped script (the records' train_gpt.py as published) is decoded first."""
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"cannot import the record script {script}")
    text = path.read_text(encoding="utf-8")
    source = unwrap(text)
    decoded = source is not text
    if sys.version_info < (3, 12):
        for old, new in PRE_PEP701:
            source = source.replace(old, new)
    filename = f"<{path} decoded>" if decoded else str(path)
    if decoded:  # tracebacks and inspect.getsource read its lines from here, not from the wrapper
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    mod = ModuleType(name)
    mod.__file__ = str(path)
    sys.modules[name] = mod  # dataclasses and torch.compile look the module up by name
    exec(compile(source, filename, "exec"), mod.__dict__)
    return mod


def record_init(mod: ModuleType) -> torch.nn.Module:
    """The record's model right after construction, seeded and cast as its train_model does."""
    h = mod.Hyperparameters()
    random.seed(h.seed)
    np.random.seed(h.seed)
    torch.manual_seed(h.seed)
    model = mod.GPT(h).bfloat16()
    mod.restore_fp32_params(model)
    return model


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    model = record_init(load_record(sys.argv[1]))
    torch.save(model.state_dict(), sys.argv[2])
    print(f"record init: {sum(p.numel() for p in model.parameters()):,} parameters -> {sys.argv[2]}")


if __name__ == "__main__":
    main()
