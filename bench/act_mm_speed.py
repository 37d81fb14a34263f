"""The MLP's GEMMs with its activation, fused GEMMs vs cuBLAS (bench code, not product code).

    python3 bench/act_mm_speed.py [--m 131072,262144] [--k 1536] [--n 512] [--slope 0.5]

For each M, times on one GPU (bf16, random h and W) the down projection (K = hidden, N = model dim):

    cublas    F.linear(a, W) on a precomputed a = leaky_relu(h)^2: the GEMM alone, the bar to meet
    unfused   torch.compile'd leaky_relu(h)^2 then F.linear: what the scorer runs without the switch
    fused     pgolf's act_mm (model.fused_mlp_gemm): one Triton GEMM, the activation in its prologue

and prints ms, TFLOP/s (2MNK / time), the fused result's largest difference from `unfused`
relative to that output's largest magnitude, and the config the autotuner picked. The first fused
call autotunes (a few seconds, untimed). A second line per M times the whole MLP,
x (M, N) -> act(x W_up^T) W_down^T, in its three forms:

    unfused   cuBLAS up, the compiled activation, cuBLAS down (no switch)
    down      cuBLAS up, then act_mm (model.fused_mlp_gemm: the activation in the down GEMM's prologue)
    up        mm_act, then cuBLAS down (model.fused_mlp_up: the activation in the up GEMM's epilogue)

with `up_gemm` the up projection alone in cuBLAS and `mm_act` alone (its bar), and each fused
form's largest difference from `unfused`. `--device cpu` with TRITON_INTERPRET=1 and small sizes is
a dry run of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pgolf.models import kernels


def bench_ms(fn, device: str, reps: int) -> float:
    fn()  # warm-up (and autotune / compile)
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=reps)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def announce(script: str, device: str) -> None:
    """Stop with the reason when the kernels cannot run here; name the GPU when there is one."""
    if kernels.unavailable_reason() is not None:
        raise SystemExit(f"{script}: {kernels.unavailable_reason()}")
    if device == "cuda":
        print(f"gpu {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)


def measure(M: int, K: int, N: int, slope: float, dev: str, rep_ms: int, unfused_fn) -> str:
    torch.manual_seed(0)
    h = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(N, K, device=dev) / K**0.5).to(torch.bfloat16)
    a = F.leaky_relu(h, slope).square()
    flop = 2.0 * M * N * K
    with torch.inference_mode():
        ref = unfused_fn(h, w)
        out = kernels.act_mm(h, w, slope)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        times = {
            "cublas": bench_ms(lambda: F.linear(a, w), dev, rep_ms),
            "unfused": bench_ms(lambda: unfused_fn(h, w), dev, rep_ms),
            "fused": bench_ms(lambda: kernels.act_mm(h, w, slope), dev, rep_ms),
        }
    cells = "  ".join(f"{k} {t:7.3f} ms {flop / t / 1e9:6.0f} TFLOP/s" for k, t in times.items())
    best = getattr(getattr(kernels, "_act_mm_tuned", None), "best_config", None)
    return f"M {M:>7} K {K} N {N}  {cells}  max rel diff {err:.1e}  config {best}"


def measure_mlp(M: int, K: int, N: int, slope: float, dev: str, rep_ms: int, act_fn) -> str:
    torch.manual_seed(0)
    x = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    w_up = (torch.randn(K, N, device=dev) / N**0.5).to(torch.bfloat16)
    w_down = (torch.randn(N, K, device=dev) / K**0.5).to(torch.bfloat16)
    forms = {
        "unfused": lambda: F.linear(act_fn(F.linear(x, w_up)), w_down),
        "down": lambda: kernels.act_mm(F.linear(x, w_up), w_down, slope),
        "up": lambda: F.linear(kernels.mm_act(x, w_up, slope), w_down),
    }
    with torch.inference_mode():
        ref = forms["unfused"]().float()
        errs = {
            k: ((f().float() - ref).abs().max() / ref.abs().max()).item()
            for k, f in forms.items()
            if k != "unfused"
        }
        times = {k: bench_ms(f, dev, rep_ms) for k, f in forms.items()}
        times["up_gemm"] = bench_ms(lambda: F.linear(x, w_up), dev, rep_ms)
        times["mm_act"] = bench_ms(lambda: kernels.mm_act(x, w_up, slope), dev, rep_ms)
    cells = "  ".join(f"{k} {t:7.3f} ms" for k, t in times.items())
    diffs = "  ".join(f"{k} diff {e:.1e}" for k, e in errs.items())
    best = getattr(getattr(kernels, "_mm_act_tuned", None), "best_config", None)
    return f"MLP M {M:>7} d {N} hidden {K}  {cells}  {diffs}  mm_act config {best}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="131072,262144")
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--slope", type=float, default=0.5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench's time budget per measurement")
    args = ap.parse_args()
    announce("act_mm_speed", args.device)
    slope = args.slope
    unfused_fn = torch.compile(
        lambda h, w: F.linear(F.leaky_relu(h, slope).square(), w), dynamic=False, fullgraph=True
    )
    act_fn = torch.compile(lambda h: F.leaky_relu(h, slope).square(), dynamic=False, fullgraph=True)
    for M in (int(m) for m in args.m.split(",")):
        print(measure(M, args.k, args.n, slope, args.device, args.rep_ms, unfused_fn), flush=True)
        print(measure_mlp(M, args.k, args.n, slope, args.device, args.rep_ms, act_fn), flush=True)


if __name__ == "__main__":
    main()
