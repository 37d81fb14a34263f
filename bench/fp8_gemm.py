"""Do FP8 matmuls pay at an experiment's shapes? bf16 against FP8 (dynamic per-tensor scales, e4m3
weights and activations, e5m2 gradients, the casts and transposes compiled into the same graph) for
every linear layer's forward and backward GEMMs, on the device (issue 18's FP8 lever).

    python bench/fp8_gemm.py --experiment pr726    # the 2026-03-23 stack: d 512, MLP 3x, vocab 1024
    python bench/fp8_gemm.py --experiment pr1775   # the sp8192 stack: MLP 4x, vocab 8192

The shapes are the experiment's own Muon matrices (model built on the meta device) plus the tied
output head, each applied to one micro-batch of tokens (train.batch_tokens / train.grad_accum_base,
one GPU). Per shape it prints ms for forward + backward in each form, summed over the layers and the
micro-steps of one optimizer step, and the FP8 output's relative error. What the FP8 form saves is
at most the GEMMs' share of a step (29% of pr726's, docs/benchmarks.md §9e); the casts it adds are
timed with it. On a CPU it prints the shapes and stops.
"""

from __future__ import annotations

import argparse
from collections import Counter
from functools import partial

import torch
from device_probe import cuda_ms, muon_matrix_shapes

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def linear_shapes(experiment: str) -> tuple[int, Counter]:
    """(micro-batch tokens, {(out_features, in_features): matrices per step}) of an experiment."""
    from pgolf.parent.compose import compose_job

    return job_linear_shapes(compose_job([f"experiment={experiment}"]))


def job_linear_shapes(job) -> tuple[int, Counter]:
    """`linear_shapes` of a composed job: its Muon matrices and the tied head's logits GEMM."""
    shapes = muon_matrix_shapes(job)
    shapes[(job.model.vocab_size, job.model.model_dim)] += 1
    return job.train.batch_tokens // job.train.grad_accum_base, shapes


def bf16_step(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x @ w.t(), dy @ w, dy.t() @ x


def _to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.finfo(dtype).max / t.abs().amax().float().clamp(min=1e-12)
    return (t.float() * scale).to(dtype), scale.reciprocal()


def fp8_step(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # _scaled_mm takes a row-major A and a column-major B; `.t().contiguous().t()` is that layout.
    x8, sx = _to_fp8(x, E4M3)
    w8, sw = _to_fp8(w, E4M3)
    dy8, sdy = _to_fp8(dy, E5M2)
    y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
    dx = torch._scaled_mm(dy8, w8.t().contiguous().t(), scale_a=sdy, scale_b=sw, out_dtype=torch.bfloat16)
    dw = torch._scaled_mm(
        dy8.t().contiguous(), x8.t().contiguous().t(), scale_a=sdy, scale_b=sx, out_dtype=torch.bfloat16
    )
    return y, dx, dw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="pr726")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()

    from pgolf.parent.compose import compose_job

    job = compose_job([f"experiment={a.experiment}"])
    tokens, shapes = job_linear_shapes(job)
    print(f"{a.experiment}: {tokens} tokens a micro-batch; (out, in) x count: {dict(shapes)}")
    if not torch.cuda.is_available():
        print("no CUDA device: shapes only")
        return
    micro_steps = job.train.grad_accum_base
    forms = {"bf16": torch.compile(bf16_step), "fp8": torch.compile(fp8_step)}
    g = torch.Generator(device="cuda").manual_seed(0)
    total = dict.fromkeys(forms, 0.0)
    for (n_out, n_in), count in shapes.items():
        x = torch.randn(tokens, n_in, device="cuda", generator=g).bfloat16()
        w = (torch.randn(n_out, n_in, device="cuda", generator=g) / n_in**0.5).bfloat16()
        dy = (torch.randn(tokens, n_out, device="cuda", generator=g) * 1e-3).bfloat16()
        ref = [t.float() for t in forms["bf16"](x, w, dy)]
        got = [t.float() for t in forms["fp8"](x, w, dy)]
        err = max(((r - o).norm() / r.norm()).item() for r, o in zip(ref, got))
        ms = {k: cuda_ms(partial(f, x, w, dy), a.warmup, a.reps) for k, f in forms.items()}
        for k in forms:
            total[k] += ms[k] * count * micro_steps
        print(
            f"({n_out}, {n_in}) x{count}: bf16 {ms['bf16']:.3f} ms, fp8 {ms['fp8']:.3f} ms "
            f"(ratio {ms['fp8'] / ms['bf16']:.3f}), fp8 relative error {err:.2e}"
        )
    print(
        f"per optimizer step ({micro_steps} micro-batches): bf16 {total['bf16']:.1f} ms, fp8 {total['fp8']:.1f} ms, "
        f"saving {total['bf16'] - total['fp8']:.1f} ms"
    )


if __name__ == "__main__":
    main()
