"""bench/r0409_init.py's `unwrap`: the record scripts as published are lzma/base85 wrappers, in two
forms. The CPU audits (tests/test_r0409_parity.py, bench/seed_parity_cpu.py) read their code
through it, so a form it misses turns those audits into a SyntaxError on the wrapper itself."""

from __future__ import annotations

import base64
import lzma
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from r0409_init import unwrap  # noqa: E402

CODE = 'def f(x):\n    return f"{x}: {", ".join("ab")}"\n'


def _xz_bytes_literal(code: str) -> str:  # PR #1532's form
    literal = repr(base64.b85encode(lzma.compress(code.encode())))
    return f"import lzma as L,base64 as B\nexec(L.decompress(B.b85decode({literal})))\n"


def _raw_lzma2_str_literal(code: str) -> str:  # the 2026-04-09 record's form
    packed = lzma.compress(code.encode(), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    literal = '"' + base64.b85encode(packed).decode() + '"'
    return (
        "import lzma as L,base64 as B\n"
        f'exec(L.decompress(B.b85decode({literal}),format=L.FORMAT_RAW,filters=[{{"id":L.FILTER_LZMA2}}]))'
    )


@pytest.mark.parametrize("wrap", [_xz_bytes_literal, _raw_lzma2_str_literal])
def test_unwrap_reads_both_published_wrapper_forms(wrap):
    assert unwrap(wrap(CODE)) == CODE


def test_plain_source_is_returned_as_it_is():
    assert unwrap(CODE) is CODE
