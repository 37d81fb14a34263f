"""Compile every autotune config of the fused q/k prologue for H100 (sm_90a) without a GPU.

    python3 bench/qk_prologue_aot.py [--head-dim 64] [--rope-dims 16] [--ptxas PATH]

A static check (bench code, not product code) like bench/act_mm_aot.py: it needs Triton but no GPU
and no TRITON_INTERPRET. For q (8 heads, with a gain) and k (4 heads, none) and each config it
prints the registers and spill bytes per thread (with Triton's bundled ptxas) and the global
load/store instructions in the PTX: the x pieces and the outputs should move as 16-byte vectors
(`v4`), the small RoPE tables as scalars. It measures no speed.
"""

from __future__ import annotations

import argparse
import os

import triton
from act_mm_aot import ptxas_usage
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pgolf.models import kernels


def compile_config(cfg, H: int, D: int, half: int, gain: bool):
    fn = kernels._qk_prologue_kernel
    sig = {name: "constexpr" for name in fn.arg_names}
    sig.update({n: "*bf16" for n in ("x_ptr", "cos_ptr", "sin_ptr", "out_ptr")})
    sig["gain_ptr"] = "*fp32" if gain else "*bf16"  # x stands in when there is no gain
    ints = (
        "n_rows",
        "T",
        "pos0",
        "stride_xt",
        "stride_ct",
        "stride_st",
        "stride_ob",
        "stride_ot",
        "stride_oh",
    )
    sig.update({n: "i32" for n in ints})
    sig["eps"] = "fp32"
    # what the launcher passes: unit table column strides (Triton specializes a 1), aligned pointers
    const = {
        "H": H,
        "D": D,
        "HALF": half,
        "HAS_GAIN": gain,
        "INTERPRET": False,
        "BLOCK_HALF": triton.next_power_of_2(half),
        "BLOCK_REST": triton.next_power_of_2(max(D - 2 * half, 1)),
        "stride_cj": 1,
        "stride_sj": 1,
        **cfg.kwargs,
    }
    aligned = ("x_ptr", "cos_ptr", "sin_ptr", "out_ptr", "stride_xt", "stride_ob", "stride_ot", "stride_oh")
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rope-dims", type=int, default=16)
    default_ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ap.add_argument("--ptxas", default=default_ptxas)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("qk_prologue_aot: unset TRITON_INTERPRET (this compiles for the GPU)")
    ops = ("ld.global.v4", "ld.global.v2", "ld.global.b16", "st.global.v4", "st.global.v2", "st.global.b16")
    for name, H, gain in (("q", 8, True), ("k", 4, False)):
        for cfg in kernels._qk_prologue_tuned.configs:
            k = compile_config(cfg, H, args.head_dim, args.rope_dims // 2, gain)
            ptx = k.asm["ptx"]
            usage = ptxas_usage(args.ptxas, ptx) if os.path.exists(args.ptxas) else "no ptxas"
            counts = " ".join(f"{op} {ptx.count(op)}" for op in ops)
            print(
                f"{name} rows {cfg.kwargs['BLOCK_ROWS']:>3} warps {cfg.num_warps}  {usage}  {counts}",
                flush=True,
            )


if __name__ == "__main__":
    main()
