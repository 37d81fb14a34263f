"""Compile every autotune config of the fused MLP GEMM for H100 (sm_90a) without a GPU.

    python3 bench/act_mm_aot.py [--k 1536] [--n 512] [--dtype bf16] [--ptxas PATH]

A static check (bench code, not product code) that can run on a CPU-only machine with Triton
installed, and without TRITON_INTERPRET. For each config it prints the shared memory the kernel
needs (an H100 block can use at most 227 KiB), the shared-memory and MMA instructions in the PTX,
and, if Triton's bundled ptxas is found, the registers and spill bytes per thread. It measures no
speed. It shows that every config builds for sm_90a and stays within resources.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pgolf.models import kernels

H100_SMEM = 232448  # bytes of shared memory one H100 thread block may use


def compile_config(cfg, K: int, N: int, dtype: str):
    fn = kernels._act_mm_kernel
    sig = {name: "constexpr" for name in fn.arg_names}
    sig.update({n: f"*{dtype}" for n in ("h_ptr", "w_ptr", "out_ptr")})
    sig.update({n: "i32" for n in ("M", "stride_hm", "stride_wn", "stride_om")})
    sig["slope"] = "fp32"
    # what the launcher passes: a unit K-stride weight (Triton specializes a 1) and aligned pointers
    const = {"N": N, "K": K, "DOT_F32": dtype == "fp32", "INTERPRET": False, "stride_wk": 1, **cfg.kwargs}
    aligned = ("h_ptr", "w_ptr", "out_ptr", "stride_hm", "stride_wn", "stride_om")
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def ptxas_usage(ptxas: str, ptx: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", out], capture_output=True, text=True
        )
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    if regs is None:
        return f"ptxas failed: {res.stderr.strip()[:200]}"
    return f"regs {regs.group(1)} spill {spill.group(1) if spill else '?'}B"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=1536)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    default_ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ap.add_argument("--ptxas", default=default_ptxas)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("act_mm_aot: unset TRITON_INTERPRET (this compiles for the GPU)")
    for cfg in kernels._act_mm_tuned.configs:
        k = compile_config(cfg, args.k, args.n, args.dtype)
        ptx = k.asm["ptx"]
        smem = k.metadata.shared
        counts = " ".join(
            f"{op} {ptx.count(op)}" for op in ("cp.async.cg", "ld.global", "st.shared", "ldmatrix")
        )
        usage = ptxas_usage(args.ptxas, ptx) if os.path.exists(args.ptxas) else "no ptxas"
        fits = "ok" if smem <= H100_SMEM else "TOO MUCH SHARED MEMORY"
        print(f"{cfg}  shared {smem / 1024:.0f} KiB {fits}  {counts}  {usage}", flush=True)


if __name__ == "__main__":
    main()
