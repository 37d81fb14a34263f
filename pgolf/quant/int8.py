"""Baseline export: per-row int8 with percentile clip, fp16 scales, zlib-9.

docs/techniques.md#baseline-int8-export

* 2-D float tensors with more than `keep_float_max_numel` elements: per row, clip at the
  `clip_percentile` quantile of |W_r|, scale s_r = max(c_r/127, 1/127) stored fp16,
  q = clamp(round(W/s), -127, 127) as int8.
* Larger non-2-D float tensors: one fp32 per-tensor scale.
* Small float tensors: kept as float (fp32 for control tensors, else fp16 with the original dtype
  restored on load). Non-float tensors pass through.
"""

from __future__ import annotations

import io
import zlib

import torch
from torch import Tensor

from pgolf.contracts import NoCalibration
from pgolf.models.layers import is_control
from pgolf.quant.config import Int8ZlibConfig

FORMAT = "pgolf_int8_per_row_v1"


def _quantile_all(x: Tensor, q: float) -> float:
    """torch.quantile's linear interpolation over all elements, also above its 2**24-element limit."""
    flat = x.flatten()
    if flat.numel() <= 2**24:
        return float(torch.quantile(flat, q))
    pos = q * (flat.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, flat.numel() - 1)
    v_lo = float(torch.kthvalue(flat, lo + 1).values)
    v_hi = float(torch.kthvalue(flat, hi + 1).values)
    return v_lo + (v_hi - v_lo) * (pos - lo)


def quantize_tensor(t: Tensor, q: float) -> tuple[Tensor, Tensor]:
    t32 = t.float()
    if t32.ndim == 2:
        clip = torch.quantile(t32.abs(), q, dim=1) if t32.numel() else torch.empty(t32.shape[0])
        clipped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
        scale = (clip / 127.0).clamp_min(1.0 / 127.0)
        codes = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
        return codes.contiguous(), scale.to(torch.float16).contiguous()
    clip = _quantile_all(t32.abs(), q) if t32.numel() else 0.0
    scale = torch.tensor(clip / 127.0 if clip > 0 else 1.0, dtype=torch.float32)
    codes = torch.clamp(torch.round(torch.clamp(t32, -clip, clip) / scale), -127, 127).to(torch.int8)
    return codes.contiguous(), scale


def dequantize_tensor(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    if scale.ndim > 0:
        s = scale.float().view(codes.shape[0], *([1] * (codes.ndim - 1)))
        return (codes.float() * s).to(dtype).contiguous()
    return (codes.float() * float(scale)).to(dtype).contiguous()


class Int8Zlib(NoCalibration):
    def __init__(self, cfg: Int8ZlibConfig):
        self.cfg = cfg

    def quantize(self, state: dict[str, Tensor]) -> dict:
        q = self.cfg.clip_percentile / 100.0
        obj: dict = {
            "format": FORMAT,
            "quantized": {},
            "scales": {},
            "dtypes": {},
            "passthrough": {},
            "orig_dtypes": {},
        }
        for name, tensor in state.items():
            t = tensor.detach().to("cpu").contiguous()
            if not t.is_floating_point():
                obj["passthrough"][name] = t
            elif t.numel() <= self.cfg.keep_float_max_numel:
                if is_control(name):
                    obj["passthrough"][name] = t.float().contiguous()
                else:
                    obj["orig_dtypes"][name] = str(t.dtype).removeprefix("torch.")
                    obj["passthrough"][name] = t.to(torch.float16).contiguous()
            else:
                codes, scale = quantize_tensor(t, q)
                obj["quantized"][name], obj["scales"][name] = codes, scale
                obj["dtypes"][name] = str(t.dtype).removeprefix("torch.")
        return obj

    @staticmethod
    def dequantize(obj: dict) -> dict[str, Tensor]:
        if obj.get("format") != FORMAT:
            raise ValueError(
                f"artifact format {obj.get('format')!r} is not {FORMAT!r}; was it written by int8_zlib?"
            )
        out = {
            name: dequantize_tensor(codes, obj["scales"][name], getattr(torch, obj["dtypes"][name]))
            for name, codes in obj["quantized"].items()
        }
        for name, t in obj["passthrough"].items():
            orig = obj["orig_dtypes"].get(name)
            out[name] = t.to(getattr(torch, orig)).contiguous() if orig else t
        return out

    def export(self, state: dict[str, Tensor], model_budget: int | None = None) -> bytes:
        # One fixed encoding, nothing to trade for bytes: the trainer refuses an over-budget blob.
        buf = io.BytesIO()
        torch.save(self.quantize(state), buf)
        return zlib.compress(buf.getvalue(), level=self.cfg.zlib_level)

    def load(self, blob: bytes) -> dict[str, Tensor]:
        return self.dequantize(torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu"))


def build(cfg: Int8ZlibConfig) -> Int8Zlib:
    return Int8Zlib(cfg)
