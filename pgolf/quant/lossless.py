"""quant=lossless: the state dict as is, so the eval scores bit-identical weights."""

from __future__ import annotations

import io
import zlib

import torch
from torch import Tensor

from pgolf.contracts import NoCalibration
from pgolf.quant.config import LosslessConfig

FORMAT = "pgolf-lossless-v1"


class Lossless(NoCalibration):
    def __init__(self, cfg: LosslessConfig):
        self.cfg = cfg

    def export(self, state: dict[str, Tensor], model_budget: int | None = None) -> bytes:
        # One fixed encoding, nothing to trade for bytes: the trainer refuses an over-budget blob.
        buf = io.BytesIO()
        torch.save(
            {"format": FORMAT, "state": {k: v.detach().cpu().contiguous() for k, v in state.items()}}, buf
        )
        return zlib.compress(buf.getvalue(), level=self.cfg.zlib_level)

    def load(self, blob: bytes) -> dict[str, Tensor]:
        obj = torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu")
        if obj.get("format") != FORMAT:
            raise ValueError(
                f"artifact format {obj.get('format')!r} is not {FORMAT!r}; was it written by quant=lossless?"
            )
        return obj["state"]


def build(cfg: LosslessConfig) -> Lossless:
    return Lossless(cfg)
