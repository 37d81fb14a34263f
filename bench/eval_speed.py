"""Sliding-eval throughput of pgolf's scorer on one GPU, by variant (bench code, not product code).

    python3 bench/eval_speed.py [--tokens N] [--variants a,b,...] [--profile VARIANT] [overrides...]

Builds the model of the given Hydra overrides (default `model=banked`: the 2026-03-23 stack) in
bf16 with random weights, a random token stream of N tokens, and times `evaluate_sliding` at
seq_len 2048 / stride 64 for each variant after compiling it (compile time printed apart). Timing
does not depend on the weights' values, so no data or training is needed. A variant is a
`+`-joined set of knobs:

    sdpa | fa3          attention backend (fa3 = whatever flash_attn_interface is importable)
    cudnn | flash       restrict SDPA to that kernel (global SDPA switches, read at trace time)
    full                score every column of every window (the pre-tail path), else tail only
    bN                  windows per forward (default b64)
    autotune            torch.compile mode max-autotune-no-cudagraphs
    fusedmm             model.fused_mlp_gemm: the MLP's activation fused into the down-projection GEMM
    fusedup             model.fused_mlp_up: the MLP's activation as the up-projection GEMM's epilogue
    cg                  torch.compile mode reduce-overhead: the batch graph replayed as a CUDA graph
    fusedqk             model.fused_qk_rope: q/k rms_norm + RoPE (+ q_gain) as one kernel per tensor
    fusedqkh            the same, writing q/k as (B, H, T, D) buffers (kernels.qk_prologue heads_major)
    cdt                 Inductor's coordinate-descent tuning of its generated kernels (longer compile)

`--profile V` runs variant V under torch.profiler and prints its top CUDA kernels.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

from pgolf.data.bpb import ByteTables
from pgolf.eval.sliding import WindowScorer, evaluate_sliding
from pgolf.eval.val import ByteLUT
from pgolf.models import attention, kernels
from pgolf.models.blocks import MLP, Attention


def build_model(overrides: list[str]) -> torch.nn.Module:
    from pgolf.components import MODELS
    from pgolf.models.layers import restore_fp32_params
    from pgolf.parent.compose import compose_job

    job = compose_job(["model=banked", *overrides])
    torch.manual_seed(0)
    model = MODELS.build(job.model).cuda().bfloat16()
    restore_fp32_params(model)
    with torch.no_grad():  # zero-initialized projections would make attention trivially cheap to skip
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def parse(variant: str) -> dict:
    knobs = {
        "backend": "sdpa",
        "sdpa_only": None,
        "tail": True,
        "batch": 64,
        "mode": None,
        "fusedmm": False,
        "fusedup": False,
        "fusedqk": None,
        "cdt": False,
    }
    for k in variant.split("+"):
        if k in ("sdpa", "fa3"):
            knobs["backend"] = k
        elif k in ("cudnn", "flash"):
            knobs["sdpa_only"] = k
        elif k == "full":
            knobs["tail"] = False
        elif k.startswith("b") and k[1:].isdigit():
            knobs["batch"] = int(k[1:])
        elif k == "autotune":
            knobs["mode"] = "max-autotune-no-cudagraphs"
        elif k in ("fusedmm", "fusedup"):
            knobs[k] = True
        elif k == "cg":
            knobs["mode"] = "reduce-overhead"
        elif k in ("fusedqk", "fusedqkh"):
            knobs["fusedqk"] = "heads_major" if k == "fusedqkh" else "rows"
        elif k == "cdt":
            knobs["cdt"] = True
        else:
            raise SystemExit(f"unknown knob {k!r} in variant {variant!r}")
    return knobs


def set_sdpa(only: str | None) -> None:
    """All kernels, torch's own order (None), or that one kernel first: recorded in the traced graph
    (pgolf.models.attention.set_sdpa_backends), so no variant reuses another's cached graph."""
    b = torch.backends.cuda
    for enable in (b.enable_flash_sdp, b.enable_cudnn_sdp, b.enable_mem_efficient_sdp, b.enable_math_sdp):
        enable(True)
    # math stays last: the tail's masked attention may need it
    attention.set_sdpa_backends(None if only is None else [only, "math"])


def set_fused_mlp_gemm(model: torch.nn.Module, down: bool, up: bool) -> None:
    """Flip model.fused_mlp_gemm / fused_mlp_up on the built model (what the config switches set
    at build time)."""
    keys = [k for k, on in (("model.fused_mlp_gemm", down), ("model.fused_mlp_up", up)) if on]
    if keys:
        kernels.require(keys)
    for m in model.modules():
        if isinstance(m, MLP):
            m.fused_gemm = kernels.act_mm if down else None
            m.fused_up = kernels.mm_act if up else None


def set_fused_qk_rope(model: torch.nn.Module, layout: str | None) -> None:
    """Flip model.fused_qk_rope on the built model; layout "rows" is the switch's (B, T, H, D) output,
    "heads_major" the (B, H, T, D) buffer; None: off."""
    fn = None
    if layout is not None:
        kernels.require(["model.fused_qk_rope"])
        fn = functools.partial(kernels.qk_prologue, heads_major=layout == "heads_major")
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_qk = fn


def make_scorer(model, stream: np.ndarray, knobs: dict, lut: ByteLUT) -> WindowScorer:
    attention.select_backend(knobs["backend"], "cuda")
    set_fused_mlp_gemm(model, knobs["fusedmm"], knobs["fusedup"])
    set_fused_qk_rope(model, knobs["fusedqk"])
    set_sdpa(knobs["sdpa_only"])
    sc = WindowScorer(
        model.token_nll,
        stream,
        2048,
        64,
        knobs["batch"],
        lut,
        torch.device("cuda"),
        torch.bfloat16,
        tail_only=knobs["tail"],
    )
    torch._inductor.config.coordinate_descent_tuning = knobs["cdt"]
    sc._batch = torch.compile(sc._batch_sums, dynamic=False, fullgraph=True, mode=knobs["mode"])
    return sc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--variants", default="sdpa+full,fa3+full,sdpa,fa3,sdpa+cudnn,sdpa+b128")
    ap.add_argument("--profile", default="")
    args, overrides = ap.parse_known_args()
    model = build_model(overrides)
    print(
        f"params {sum(p.numel() for p in model.parameters()):,} gpu {torch.cuda.get_device_name()}",
        flush=True,
    )
    rng = np.random.default_rng(0)
    vocab = model.cfg.vocab_size
    stream = rng.integers(0, vocab, args.tokens).astype(np.uint16)
    tables = ByteTables(
        rng.integers(1, 5, vocab).astype(np.int16), rng.random(vocab) < 0.3, np.arange(vocab) == 0
    )
    lut = ByteLUT(tables, torch.device("cuda"))
    for variant in [v for v in args.variants.split(",") if v]:
        knobs = parse(variant)
        torch._dynamo.reset()
        try:
            sc = make_scorer(model, stream, knobs, lut)
            t0 = time.perf_counter()
            sc.warmup()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            evaluate_sliding(sc)  # one untimed pass: allocator and autotune caches settle
            res = evaluate_sliding(sc, sync=torch.cuda.synchronize)
            print(
                f"variant {variant:<22} compile {compile_s:6.1f}s  eval {res.seconds:7.3f}s  "
                f"scored tok/s {res.tokens_per_s:>10,.0f}  fwd tok/s {res.tokens_per_s * 32:>12,.0f}  "
                f"loss {res.val_loss:.6f}  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
                flush=True,
            )
        except Exception as e:  # a kernel that does not support these shapes: say so, go on
            print(f"variant {variant:<22} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    if args.profile:
        knobs = parse(args.profile)
        torch._dynamo.reset()
        sc = make_scorer(model, stream[: 64 * 64 * 8 + 2048], knobs, lut)
        sc.warmup()
        evaluate_sliding(sc)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            evaluate_sliding(sc, sync=torch.cuda.synchronize)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90))


if __name__ == "__main__":
    main()
