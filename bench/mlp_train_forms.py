"""model.fused_mlp_train's two kernel forms, and #1775's own kernel, on one GPU (bench code).

    python3 bench/mlp_train_forms.py [--m 98304] [--d 512] [--hidden 2048] [--ref .refs/pr1775/train_gpt.py]

Times the two launches of the fused training MLP on bf16 operands of the record's shapes (M rows a
micro-batch: #1775 on one GPU runs 786,432 / 8 = 98,304 tokens a micro-batch):

    up     x (M, d) @ W_up^T -> pre-activation and leaky_relu(., 0.5)^2, one GEMM (forward)
    dact   dOut (M, d) @ W_down -> its product with act'(pre), one GEMM (backward)

in each form of `pgolf.models.fused_mlp_train`: `pointer` (the autotuned tile kernel) and `tma`
(persistent, TMA loads and stores; what Hopper runs). With --ref, #1775's `linear_leaky_relu_square`
from the script is timed on the same tensors (its backward on W_down^T made contiguous, as the
script calls it, the copy excluded). Each line: ms, TFLOP/s (2MNK / time), and how many elements
differ from the pointer form's outputs (both round one fp32 tile once; the sums may run in
another order). Exits 1 when more than --max-differing (a fraction) of any output of the TMA form
differs from the pointer form's. `--device cpu` with TRITON_INTERPRET=1 and small sizes is a dry
run only.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from act_mm_speed import announce, bench_ms  # noqa: E402

from pgolf.models import fused_mlp_train  # noqa: E402


def load_ref(path: str):
    """#1775's `linear_leaky_relu_square(a, b, aux=None)` from its script (its module-level code only
    defines things; main() runs under `__main__`)."""
    spec = importlib.util.spec_from_file_location("ref_pr1775", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.linear_leaky_relu_square


def run_form(form: str, x, w_up, w_down, g, slope):
    fused_mlp_train.TMA_FORM = {"pointer": "off", "tma": "on"}[form]
    if form == "tma" and not fused_mlp_train._tma_form(x, w_up, g, w_down):
        raise SystemExit(
            "mlp_train_forms: these operands take the pointer form (not bf16 rows TMA can address)"
        )
    pre, post = fused_mlp_train._mlp_up_act_impl(fused_mlp_train._mlp_up_tuned, x, w_up, slope)
    dpre = fused_mlp_train._mlp_dact_impl(fused_mlp_train._mlp_dact_tuned, g, w_down, pre, slope)
    return pre, post, dpre


def timed_calls(x, w_up, w_down, g, pre, slope):
    """The two launches of the form now set, as zero-argument calls."""

    def up():
        return fused_mlp_train._mlp_up_act_impl(fused_mlp_train._mlp_up_tuned, x, w_up, slope)

    def dact():
        return fused_mlp_train._mlp_dact_impl(fused_mlp_train._mlp_dact_tuned, g, w_down, pre, slope)

    return up, dact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=98304)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--slope", type=float, default=0.5)
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--ref", default=None, help="the seed script whose linear_leaky_relu_square to time too")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-differing", type=float, default=1e-3)
    args = ap.parse_args()
    announce("mlp_train_forms", args.device)
    dev, M, d, H, slope = args.device, args.m, args.d, args.hidden, args.slope
    torch.manual_seed(0)
    x = torch.randn(M, d, device=dev, dtype=torch.bfloat16)
    g = torch.randn(M, d, device=dev, dtype=torch.bfloat16)
    w_up = (torch.randn(H, d, device=dev) / d**0.5).to(torch.bfloat16)
    w_down = (torch.randn(d, H, device=dev) / H**0.5).to(torch.bfloat16)
    flop = 2.0 * M * d * H
    base = run_form("pointer", x, w_up, w_down, g, slope)
    worst = 0.0
    for form in ("pointer", "tma"):
        outs = run_form(form, x, w_up, w_down, g, slope)
        worst = max(worst, *((a != b).float().mean().item() for a, b in zip(outs, base)))
        diff = " ".join(
            f"{n} {(a != b).sum().item()}" for n, a, b in zip(("pre", "post", "dpre"), outs, base)
        )
        up_fn, dact_fn = timed_calls(x, w_up, w_down, g, outs[0], slope)
        t_up, t_dact = bench_ms(up_fn, dev, args.rep_ms), bench_ms(dact_fn, dev, args.rep_ms)
        print(
            f"{form:8s} up {t_up:7.3f} ms {flop / t_up / 1e9:5.0f} TFLOP/s  dact {t_dact:7.3f} ms "
            f"{flop / t_dact / 1e9:5.0f} TFLOP/s  sum {t_up + t_dact:7.3f} ms  differing elements vs pointer: {diff}",
            flush=True,
        )
    print(f"tma form: at most {worst:.2e} of an output's elements differ from the pointer form's", flush=True)
    if args.ref:
        ref = load_ref(args.ref)
        w_down_t = w_down.t().contiguous()
        pre_r, post_r = ref(x, w_up)
        dpre_r = ref(g, w_down_t, aux=pre_r)
        diff = " ".join(
            f"{n} {(a != b).sum().item()}"
            for n, a, b in zip(("pre", "post", "dpre"), (pre_r, post_r, dpre_r), base)
        )
        t_up = bench_ms(lambda: ref(x, w_up), dev, args.rep_ms)
        t_dact = bench_ms(lambda: ref(g, w_down_t, aux=pre_r), dev, args.rep_ms)
        print(
            f"script   up {t_up:7.3f} ms {flop / t_up / 1e9:5.0f} TFLOP/s  dact {t_dact:7.3f} ms "
            f"{flop / t_dact / 1e9:5.0f} TFLOP/s  sum {t_up + t_dact:7.3f} ms  differing elements vs pointer: {diff}",
            flush=True,
        )
    if worst > args.max_differing:
        raise SystemExit(
            f"mlp_train_forms: the TMA form differs in {worst:.2e} > {args.max_differing} of an output"
        )


if __name__ == "__main__":
    main()
