"""Compressors as a switch: zlib, zstd, lzma and brotli, plus a byte shuffle.

docs/techniques.md#compressors-and-byte-shuffle


zlib and lzma are in the standard library; zstd and brotli are the pip packages `zstandard` and
`brotli` (pgolf's dependencies), imported only when chosen so a missing one fails with the fix.
"""

from __future__ import annotations

import importlib
import lzma
import zlib
from collections.abc import Callable

import numpy as np

COMPRESSORS = ("zlib", "zstd", "lzma", "brotli")
_PIP = {"zstd": ("zstandard", "zstandard"), "brotli": ("brotli", "brotli")}


def _module(kind: str):
    mod, pip = _PIP[kind]
    try:
        return importlib.import_module(mod)
    except ImportError as e:
        raise RuntimeError(
            f"quant.compressor={kind} needs the Python package {pip!r}; install it with "
            f"`pip install {pip}` (bash launch/setup.sh does) or choose quant.compressor=lzma|zlib"
        ) from e


def available() -> list[str]:
    out = []
    for kind in COMPRESSORS:
        try:
            if kind in _PIP:
                _module(kind)
            out.append(kind)
        except RuntimeError:
            pass
    return out


def compressor(
    kind: str, level: int, extreme: bool = False
) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """(compress, decompress) for `kind` at `level`; `extreme` adds lzma's PRESET_EXTREME."""
    if kind == "zlib":
        return (lambda b: zlib.compress(b, level)), zlib.decompress
    if kind == "lzma":
        preset = level | lzma.PRESET_EXTREME if extreme else level
        return (lambda b: lzma.compress(b, preset=preset)), lzma.decompress
    if kind == "zstd":
        zstd = _module("zstd")
        return (
            lambda b: zstd.ZstdCompressor(level=level).compress(b),
            lambda b: zstd.ZstdDecompressor().decompress(b),
        )
    if kind == "brotli":
        brotli = _module("brotli")
        return (lambda b: brotli.compress(b, quality=level)), brotli.decompress
    raise ValueError(f"unknown compressor {kind!r}; choose one of {', '.join(COMPRESSORS)}")


def shuffle(data: bytes, stride: int) -> bytes:
    """Byte k of every `stride`-byte element, for k = 0..stride-1, one after the other.

    The high bytes of fp16/fp32 values (sign, exponent) repeat far more than the low ones; grouped
    together they compress better. `len(data)` must be a multiple of `stride`.
    """
    if stride <= 1 or not data:
        return data
    a = np.frombuffer(data, dtype=np.uint8).reshape(-1, stride)
    return np.ascontiguousarray(a.T).tobytes()


def unshuffle(data: bytes, stride: int) -> bytes:
    if stride <= 1 or not data:
        return data
    a = np.frombuffer(data, dtype=np.uint8).reshape(stride, -1)
    return np.ascontiguousarray(a.T).tobytes()
