"""The attention's q/k prologue, fused kernel vs Inductor (bench code, not product code).

    python3 bench/qk_prologue_speed.py [--shapes 128x2048x8x64,128x2048x4x64] [--rope-dims 16]

For each (B, T, H, D) shape (default: the 2026-03-23 stack's q and k at 128 windows per forward),
times on one GPU, bf16 x, bf16 RoPE tables, an fp32 per-head gain on q-shaped inputs (H = 8) only:

    copy      x.clone(): one read and one write of x, the memory-bandwidth bar to meet
    compiled  torch.compile'd rms_norm -> partial RoPE -> gain -> bf16, as the scorer runs it under
              CUDA autocast (rms_norm's output is fp32 there; SDPA's autocast makes the bf16 copy)
    fused     pgolf's qk_prologue (model.fused_qk_rope), (B, T, H, D) output
    fusedh    the same writing a (B, H, T, D) buffer (heads_major=True)

and prints ms and GB/s (bytes of x read + y written / time), the fused result's largest difference
from `compiled` relative to that output's largest magnitude, the number of elements that differ
(each difference is expected to be one bf16 rounding step), and the config the autotuner picked.
In the whole eval the unfused prologue costs more than `compiled` here suggests: there it is
several kernels, with a separate fp32 -> bf16 copy (see docs/fused_qk_rope.md).
`--device cpu` with TRITON_INTERPRET=1 and small shapes is a dry run of this script, not a measurement.
"""

from __future__ import annotations

import argparse

import torch
from act_mm_speed import announce, bench_ms  # bench/ is the script's own folder, so on sys.path

from pgolf.models import kernels
from pgolf.models.layers import apply_partial_rotary, rms_norm, rotary_tables


def unfused(x, cos, sin, rope_dims: int, gain):
    # Attention.forward's eager prologue under CUDA autocast: rms_norm runs (and returns) fp32
    q = apply_partial_rotary(rms_norm(x.float()), cos, sin, rope_dims)
    if gain is not None:
        q = q * gain[None, None, :, None]
    return q.to(x.dtype)  # what SDPA's autocast cast does


def measure(shape: tuple[int, ...], rope_dims: int, dev: str, rep_ms: int, compiled) -> str:
    B, T, H, D = shape
    torch.manual_seed(0)
    x = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    cos, sin = rotary_tables(T, rope_dims, 10_000.0, torch.device(dev), torch.bfloat16)
    gain = (1.0 + torch.rand(H, device=dev)) if H == 8 else None  # q: q_gain; k: none
    nbytes = 2 * x.numel() * x.element_size()
    with torch.inference_mode():
        ref = compiled(x, cos, sin, rope_dims, gain)
        out = kernels.qk_prologue(x, cos, sin, rope_dims, gain)
        outh = kernels.qk_prologue(x, cos, sin, rope_dims, gain, heads_major=True)
        assert torch.equal(out, outh), "the two layouts disagree"
        diff = (out.float() - ref.float()).abs()
        rel = (diff.max() / ref.float().abs().max()).item()
        n_diff = int((diff > 0).sum())
        times = {
            "copy": bench_ms(lambda: x.clone(), dev, rep_ms),
            "compiled": bench_ms(lambda: compiled(x, cos, sin, rope_dims, gain), dev, rep_ms),
            "fused": bench_ms(lambda: kernels.qk_prologue(x, cos, sin, rope_dims, gain), dev, rep_ms),
            "fusedh": bench_ms(
                lambda: kernels.qk_prologue(x, cos, sin, rope_dims, gain, heads_major=True), dev, rep_ms
            ),
        }
    cells = "  ".join(f"{k} {t:7.3f} ms {nbytes / t / 1e6:5.0f} GB/s" for k, t in times.items())
    tuned = getattr(kernels, "_qk_prologue_tuned", None)
    best = getattr(tuned, "best_config", None)
    name = "x".join(map(str, shape))
    return (
        f"{name:>16} rope {rope_dims} gain {gain is not None}  {cells}  max rel diff {rel:.1e} "
        f"({n_diff} of {out.numel()} differ)  config {best}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="128x2048x8x64,128x2048x4x64")
    ap.add_argument("--rope-dims", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench's time budget per measurement")
    args = ap.parse_args()
    announce("qk_prologue_speed", args.device)
    backend = "inductor" if args.device == "cuda" else "aot_eager"
    compiled = torch.compile(unfused, dynamic=False, fullgraph=True, backend=backend)
    for s in args.shapes.split(","):
        shape = tuple(int(n) for n in s.split("x"))
        print(measure(shape, args.rope_dims, args.device, args.rep_ms, compiled), flush=True)


if __name__ == "__main__":
    main()
