"""Optional fused Triton kernels behind model switches (docs/techniques.md#fused-kernels).

* `model.fused_mlp`: the MLP activation leaky_relu(h, slope)^2 (relu^2 with slope 0), forward and
  backward in one elementwise pass each, computed in fp32 and stored in h's dtype.
* `model.fused_mlp_train`: in `pgolf.models.fused_mlp_train`, which builds on this module's GEMM.
* `model.fused_ce`: soft-capped cross entropy. From the raw logits x (N, V), z = cap*tanh(x/cap);
  the loss is logsumexp(z) - z[target]. The forward streams each row once (online softmax) and
  keeps only the row's logsumexp for the backward, which writes
  dx = g * (softmax(z) - onehot) * (1 - tanh^2) without materializing z or the fp32 logits.
* `model.fused_mlp_gemm` (inference only): out = leaky_relu(h, slope)^2 @ W_down^T as one GEMM
  whose prologue applies the activation to each h tile in registers as it is loaded, so the
  activation tensor (M x hidden) is never written or read back. A `torch.library` op (`triton_op`
  where available, so Inductor sees the kernel), traceable under torch.compile(fullgraph=True).
* `model.fused_mlp_up` (inference only): out = leaky_relu(x @ W_up^T, slope)^2 as one GEMM whose
  epilogue applies the activation, so the down projection stays a cuBLAS GEMM; the same kind of
  `torch.library` op. Faster than `fused_mlp_gemm` on the record shapes (its main loop is a plain
  GEMM); at most one of the two is on.
* `model.fused_qk_rope` (inference only): y = gain[h] * rope(rms_norm(x)) for the attention's q
  (with q_gain) and k, one read and one write each instead of several norm/RoPE/cat/cast kernels;
  the same kind of `torch.library` op.

Triton is imported lazily: without it this module still imports, and `require` names what is
missing. On a machine without CUDA the kernels run under the Triton interpreter
(`TRITON_INTERPRET=1`), which is how the parity tests run them on CPU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the switches then refuse to turn on (see `require`)
    triton = None

ELEMENTWISE_BLOCK = 1024
CE_BLOCK = 1024


def unavailable_reason() -> str | None:
    """Why the fused kernels cannot run here, or None when they can."""
    if triton is None:
        return "Triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
    return None


def require(keys: list[str]) -> None:
    """Raise a clear error if a fused-kernel switch is on where the kernels cannot run."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(
            f"{' and '.join(keys)}=true needs the fused Triton kernels, but {reason}; "
            f"set {'/'.join(keys)}=false to use the eager path"
        )


if triton is not None:

    @triton.jit
    def _tanh(u):
        # 1 - 2/(e^{2u}+1): saturates to +-1 without overflow (e^{2u} -> inf gives 1, -> 0 gives -1)
        return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)

    # Scalar float arguments arrive as fp32 from a plain launch but as fp64 when Inductor launches the
    # kernel inside a compiled graph; every kernel casts them first, so its arithmetic (and a loop-carried
    # value's type) is fp32 either way.
    @triton.jit
    def _leaky2_fwd(h_ptr, y_ptr, n, slope, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
        slope = tl.cast(slope, tl.float32)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.where(h > 0, h, h * slope)
        tl.store(y_ptr + offs, _round_to(a * a, y_ptr.dtype.element_ty, INTERPRET), mask=mask)

    @triton.jit
    def _leaky2_bwd(h_ptr, g_ptr, dh_ptr, n, slope, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
        slope = tl.cast(slope, tl.float32)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pos = h > 0
        a = tl.where(pos, h, h * slope)
        dh = 2.0 * a * tl.where(pos, 1.0, slope) * g
        tl.store(dh_ptr + offs, _round_to(dh, dh_ptr.dtype.element_ty, INTERPRET), mask=mask)

    # V (the vocabulary) is a compile-time constant: the loops below run over it, and Triton's CPU
    # interpreter cannot iterate `range` over a runtime scalar (it holds it as a 1-element array,
    # which NumPy >= 2 refuses to turn into an int). The kernels compile once per vocabulary.
    @triton.jit
    def _softcap_ce_fwd(x_ptr, t_ptr, loss_ptr, lse_ptr, V: tl.constexpr, stride, cap, BLOCK: tl.constexpr):
        cap = tl.cast(cap, tl.float32)
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
        s_vec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            z = tl.where(mask, cap * _tanh(x / cap), float("-inf"))
            m_new = tl.maximum(m_vec, z)
            empty = m_new == float("-inf")  # lanes that have seen only padding so far
            s_vec = tl.where(empty, 0.0, s_vec * tl.exp(m_vec - m_new) + tl.exp(z - m_new))
            m_vec = m_new
        m = tl.max(m_vec, 0)
        lse = m + tl.log(tl.sum(tl.where(m_vec == float("-inf"), 0.0, s_vec * tl.exp(m_vec - m)), 0))
        t = tl.load(t_ptr + row)
        zt = cap * _tanh(tl.load(base + t).to(tl.float32) / cap)
        tl.store(loss_ptr + row, lse - zt)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _softcap_ce_bwd(
        x_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr, V: tl.constexpr, stride, cap, BLOCK: tl.constexpr
    ):
        cap = tl.cast(cap, tl.float32)
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        out = dx_ptr + row * V
        t = tl.load(t_ptr + row)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            th = _tanh(x / cap)
            p = tl.exp(cap * th - lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(out + cols, (g * p * (1.0 - th * th)).to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
        # fp32 -> dtype, round to nearest even (the GPU's cast). Triton 3.6's interpreter truncates
        # fp32 -> bf16, so there the rounding is done on the bits first and the cast is then exact.
        if INTERPRET:
            if dtype == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _load_k_tile(ptrs, rk, k_left, K_AXIS: tl.constexpr, EVEN_K: tl.constexpr):
        # a tile whose axis K_AXIS runs along K; past the end of K (k_left left) it reads zeros
        if EVEN_K:
            tile = tl.load(ptrs)
        elif K_AXIS == 1:
            tile = tl.load(ptrs, mask=(rk < k_left)[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rk < k_left)[:, None], other=0.0)
        return tile

    @triton.jit
    def _gemm_tile(a_ptr, w_ptr, M, stride_am, stride_wn, stride_wk, N, BLOCK_M, BLOCK_N, BLOCK_K):
        # This program's (BLOCK_M, BLOCK_N) output tile of a (M, K) @ W^T, W (N, K) read as (K, N)
        # tiles through its strides: the first K step's operand pointers, and where the tile lies.
        # N varies fastest over the program ids, so the programs that share an `a` row block run
        # together and read it from L2; W (1.5 MB at the record sizes) stays in L2 anyway, which is
        # why there is no GROUP_M swizzle.
        pid = tl.program_id(0)
        n_tiles = (N + BLOCK_N - 1) // BLOCK_N
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
        rows_left = M - pid_m * BLOCK_M  # int32 is enough: M < 2^31 rows
        row0 = pid_m.to(tl.int64) * BLOCK_M  # M * K exceeds 2^31 elements: the tile base is int64
        rm = tl.arange(0, BLOCK_M)
        rm_load = tl.where(rm < rows_left, rm, 0)  # tail rows re-read row 0; their outputs are not stored
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_load = rn
        if N % BLOCK_N != 0:  # ragged N: wrap the tail columns (their outputs are not stored)
            rn_load = rn % N
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + row0 * stride_am + (rm_load[:, None] * stride_am + rk[None, :])
        b_ptrs = w_ptr + (rk[:, None] * stride_wk + rn_load[None, :] * stride_wn)
        return a_ptrs, b_ptrs, rk, rm, rn, rows_left, row0

    @triton.jit
    def _store_tile(out_ptr, value, row0, rm, rn, rows_left, N, stride_om, INTERPRET: tl.constexpr):
        o_ptrs = out_ptr + row0 * stride_om + (rm[:, None] * stride_om + rn[None, :])
        out = _round_to(value, out_ptr.dtype.element_ty, INTERPRET)
        tl.store(o_ptrs, out, mask=(rm[:, None] < rows_left) & (rn[None, :] < N))

    @triton.jit
    def _act_mm_kernel(
        h_ptr,
        w_ptr,
        out_ptr,
        M,
        stride_hm,
        stride_wn,
        stride_wk,
        stride_om,
        slope,
        N: tl.constexpr,
        K: tl.constexpr,
        DOT_F32: tl.constexpr,
        INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        # One (BLOCK_M, BLOCK_N) tile of out = act(h) @ W^T; h (M, K) with unit column stride.
        slope = tl.cast(slope, tl.float32)
        a_ptrs, b_ptrs, rk, rm, rn, rows_left, row0 = _gemm_tile(
            h_ptr, w_ptr, M, stride_hm, stride_wn, stride_wk, N, BLOCK_M, BLOCK_N, BLOCK_K
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        EVEN_K = K % BLOCK_K == 0
        if PREFETCH:
            h_next = _load_k_tile(a_ptrs, rk, K, 1, EVEN_K)
        for k in range(0, K, BLOCK_K):
            if PREFETCH:
                # h straight from global memory into registers one step ahead; the pipelined form
                # below stages it in shared memory first, which on Hopper then costs a second
                # shared-memory round trip to reach the wgmma operand layout after the activation.
                # The autotuner picks whichever form is faster.
                h = h_next
                step = BLOCK_K if k + BLOCK_K < K else 0  # the last step re-reads its own tile
                a_ptrs += step
                h_next = _load_k_tile(a_ptrs, rk, K - k - step, 1, EVEN_K)
            else:
                h = _load_k_tile(a_ptrs, rk, K - k, 1, EVEN_K)
                a_ptrs += BLOCK_K
            w = _load_k_tile(b_ptrs, rk, K - k, 0, EVEN_K)
            # the prologue: exactly what the unfused path feeds the GEMM (fp32, rounded to h's dtype)
            hf = h.to(tl.float32)
            a = tl.where(hf > 0, hf, hf * slope)
            a = _round_to(a * a, h_ptr.dtype.element_ty, INTERPRET)
            if DOT_F32:  # fp32 operands, or the interpreter (see `_INTERPRET`)
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            b_ptrs += BLOCK_K * stride_wk
        _store_tile(out_ptr, acc, row0, rm, rn, rows_left, N, stride_om, INTERPRET)

    def _act_mm_configs() -> list:
        if os.environ.get("TRITON_INTERPRET") == "1":  # one small tile: the interpreter does not tune
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "PREFETCH": False})]
        shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, PREFETCH): H100 wgmma tiles
            (128, 256, 64, 3, 8, False),
            (128, 256, 64, 4, 8, False),
            (256, 128, 64, 3, 8, False),
            (128, 128, 64, 4, 4, False),
            (128, 128, 64, 4, 8, False),
            (128, 256, 64, 3, 8, True),
            (128, 256, 64, 4, 8, True),
            (256, 128, 64, 3, 8, True),
            (128, 128, 64, 4, 8, True),
        ]
        return [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PREFETCH": pf}, num_stages=st, num_warps=wp
            )
            for bm, bn, bk, st, wp, pf in shapes
        ]

    # Tuned once per (N, K): the first call (the scorer's warm-up, before the clock) picks the
    # config. M is left out of the key so a ragged last batch never re-tunes inside the timed loop.
    _act_mm_tuned = triton.autotune(configs=_act_mm_configs(), key=["N", "K"])(_act_mm_kernel)

    # Triton 3.6's interpreter multiplies bf16 tiles as their raw uint16 bits, so there the dot runs
    # on the tiles upcast to fp32: the same products (bf16 x bf16 is exact in fp32), fp32 sums; and
    # it truncates fp32 -> bf16 casts, which `_round_to` corrects. The GPU code has neither branch.
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

    def _gemm_launch(kernel, a: Tensor, w: Tensor, out: Tensor, slope: float, **meta) -> None:
        """Launch act_mm's or mm_act's kernel (the same arguments) over out's (M, N) tiles."""
        M, K = a.shape
        N = w.shape[0]

        def grid(META: dict) -> tuple[int]:
            return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)

        kernel[grid](
            a,
            w,
            out,
            M,
            a.stride(0),
            w.stride(0),
            w.stride(1),
            out.stride(0),
            slope,
            N=N,
            K=K,
            DOT_F32=a.dtype == torch.float32 or _INTERPRET,
            INTERPRET=_INTERPRET,
            **meta,
        )

    def _gemm_out(h: Tensor, w: Tensor) -> Tensor:
        return torch.empty((h.shape[0], w.shape[0]), device=h.device, dtype=h.dtype)

    # torch >= 2.6: a triton_op, so Inductor sees the kernel. PGOLF_ACT_MM_OPAQUE=1 registers the
    # opaque op instead (a fallback to try should some torch version's Inductor mishandle it).
    # It covers pgolf::qk_prologue (model.fused_qk_rope) too.
    _TRITON_OP = hasattr(torch.library, "triton_op") and os.environ.get("PGOLF_ACT_MM_OPAQUE") != "1"

    def _register_gemm_op(name: str, tuned) -> None:
        """torch.ops.pgolf.<name>(a, w, slope) -> (M, N), launching the autotuned `tuned` kernel:
        a triton_op where available (Inductor sees the kernel), else an opaque custom_op with a
        shape-only fake (the interpreter's kernels cannot be traced into)."""
        if _TRITON_OP and not _INTERPRET:

            @torch.library.triton_op(f"pgolf::{name}", mutates_args=())
            def _op(a: Tensor, w: Tensor, slope: float) -> Tensor:
                out = _gemm_out(a, w)
                _gemm_launch(torch.library.wrap_triton(tuned), a, w, out, slope)
                return out

        else:

            @torch.library.custom_op(f"pgolf::{name}", mutates_args=())
            def _op(a: Tensor, w: Tensor, slope: float) -> Tensor:
                out = _gemm_out(a, w)
                _gemm_launch(tuned, a, w, out, slope)
                return out

            @_op.register_fake
            def _fake(a: Tensor, w: Tensor, slope: float) -> Tensor:
                return _gemm_out(a, w)

    _register_gemm_op("act_mm", _act_mm_tuned)

    # ---- the activation as the up-projection's epilogue: out = act(round(x @ W_up^T)) ----

    @triton.jit
    def _gemm_acc(
        a_ptr, w_ptr, M, stride_am, stride_wn, stride_wk, N, K: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # The main loop of a plain GEMM: this program's fp32 (BLOCK_M, BLOCK_N) tile of a @ W^T
        # (both operands through shared memory untouched, the pipelined cp.async + wgmma loop) and
        # where it lies, for an epilogue to finish (mm_act here, fused_mlp_train's both ways).
        a_ptrs, b_ptrs, rk, rm, rn, rows_left, row0 = _gemm_tile(
            a_ptr, w_ptr, M, stride_am, stride_wn, stride_wk, N, BLOCK_M, BLOCK_N, BLOCK_K
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        EVEN_K = K % BLOCK_K == 0
        for k in range(0, K, BLOCK_K):
            a = _load_k_tile(a_ptrs, rk, K - k, 1, EVEN_K)
            b = _load_k_tile(b_ptrs, rk, K - k, 0, EVEN_K)
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wk
        return acc, rm, rn, rows_left, row0

    @triton.jit
    def _mm_act_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        M,
        stride_xm,
        stride_wn,
        stride_wk,
        stride_om,
        slope,
        N: tl.constexpr,
        K: tl.constexpr,
        DOT_F32: tl.constexpr,
        INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One (BLOCK_M, BLOCK_N) tile of the up-projection: a plain GEMM's main loop (`_gemm_acc`),
        # and the activation once per output element in the epilogue, where the tile is in registers.
        slope = tl.cast(slope, tl.float32)
        acc, rm, rn, rows_left, row0 = _gemm_acc(
            x_ptr, w_ptr, M, stride_xm, stride_wn, stride_wk, N, K, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K
        )
        # the epilogue: exactly what the unfused path computes from the GEMM's stored output h
        # (rounded to the output dtype), the activation in fp32, rounded once more at the store
        h = _round_to(acc, out_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        y = tl.where(h > 0, h, h * slope)
        _store_tile(out_ptr, y * y, row0, rm, rn, rows_left, N, stride_om, INTERPRET)

    def _mm_act_configs() -> list:
        if os.environ.get("TRITON_INTERPRET") == "1":
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
        shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): H100 wgmma tiles
            (128, 256, 64, 3, 8),
            (128, 256, 64, 4, 8),
            (128, 256, 64, 5, 8),
            (128, 256, 32, 6, 8),
            (256, 128, 64, 3, 8),
            (256, 128, 64, 4, 8),
            (128, 128, 64, 4, 4),
            (128, 128, 64, 5, 8),
            (128, 256, 128, 2, 8),
            (128, 256, 128, 3, 8),
            (128, 128, 128, 3, 8),
            (64, 256, 64, 5, 4),
        ]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=st, num_warps=wp)
            for bm, bn, bk, st, wp in shapes
        ]

    # Tuned once per (N, K) by the first call (the scorer's warm-up), as act_mm.
    _mm_act_tuned = triton.autotune(configs=_mm_act_configs(), key=["N", "K"])(_mm_act_kernel)

    _register_gemm_op("mm_act", _mm_act_tuned)

    # ---- model.fused_qk_rope: rms_norm + partial RoPE (+ per-head gain) of q or k in one pass ----

    @triton.jit
    def _qk_prologue_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        gain_ptr,
        out_ptr,
        n_rows,
        T,
        pos0,
        stride_xt,
        stride_ct,
        stride_cj,
        stride_st,
        stride_sj,
        stride_ob,
        stride_ot,
        stride_oh,
        eps,
        H: tl.constexpr,
        D: tl.constexpr,
        HALF: tl.constexpr,
        HAS_GAIN: tl.constexpr,
        INTERPRET: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_REST: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
    ):
        # BLOCK_ROWS head rows r = (b*T + t)*H + h of x (B, T, H, D), each D wide, read once as three
        # contiguous pieces: x1 = dims [0, HALF), x2 = [HALF, 2 HALF) (the rotated halves) and the
        # REST that passes through. Contiguous pieces load and store as vectors; RoPE then pairs
        # x1 with x2 element by element, with no gather. fp32 math, one rounding at the store.
        REST: tl.constexpr = D - 2 * HALF
        r = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        r_ok = r < n_rows
        bt = r // H
        h = r - bt * H
        b = bt // T
        t = bt - b * T
        j = tl.arange(0, BLOCK_HALF)
        mask = r_ok[:, None] & (j < HALF)[None, :]
        row = x_ptr + (bt * stride_xt + h * D)[:, None]
        x1 = tl.load(row + j[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(row + HALF + j[None, :], mask=mask, other=0.0).to(tl.float32)
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        if REST > 0:
            e = tl.arange(0, BLOCK_REST)
            rmask = r_ok[:, None] & (e < REST)[None, :]
            xr = tl.load(row + 2 * HALF + e[None, :], mask=rmask, other=0.0).to(tl.float32)
            ss += tl.sum(xr * xr, axis=1)
        # F.rms_norm with eps=None: mean of squares in fp32, eps = fp32's machine epsilon
        inv = tl.rsqrt(ss / D + eps)[:, None]
        pos = (pos0 + t)[:, None]
        c = tl.load(cos_ptr + pos * stride_ct + j[None, :] * stride_cj, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_st + j[None, :] * stride_sj, mask=mask, other=0.0).to(tl.float32)
        n1 = x1 * inv
        n2 = x2 * inv
        y1 = n1 * c + n2 * s  # apply_rotary: (x1 cos + x2 sin, x2 cos - x1 sin)
        y2 = n2 * c - n1 * s
        if HAS_GAIN:
            g = tl.load(gain_ptr + h, mask=r_ok, other=0.0).to(tl.float32)[:, None]
            y1 = y1 * g
            y2 = y2 * g
        o = out_ptr + (b * stride_ob + t * stride_ot + h * stride_oh)[:, None]
        dt = out_ptr.dtype.element_ty
        tl.store(o + j[None, :], _round_to(y1, dt, INTERPRET), mask=mask)
        tl.store(o + HALF + j[None, :], _round_to(y2, dt, INTERPRET), mask=mask)
        if REST > 0:
            yr = xr * inv
            if HAS_GAIN:
                yr = yr * g
            tl.store(o + 2 * HALF + e[None, :], _round_to(yr, dt, INTERPRET), mask=rmask)

    def _qk_prologue_configs() -> list:
        if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter does not tune
            return [triton.Config({"BLOCK_ROWS": 16})]
        # memory-bound: rows per program x warps; 64-wide bf16 rows are 128 B, one per 4 warp lanes
        shapes = [(32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]
        return [triton.Config({"BLOCK_ROWS": br}, num_warps=wp) for br, wp in shapes]

    # Tuned once per head shape (q and k differ in H): the scorer's warm-up call picks the config;
    # the row count is left out of the key, so the tail-only final block reuses it.
    _qk_prologue_tuned = triton.autotune(configs=_qk_prologue_configs(), key=["H", "D", "HALF", "HAS_GAIN"])(
        _qk_prologue_kernel
    )
    _RMS_EPS = torch.finfo(torch.float32).eps

    def _qk_prologue_new(x: Tensor, heads_major: bool) -> Tensor:
        B, T, H, D = x.shape
        shape = (B, H, T, D) if heads_major else (B, T, H, D)
        return torch.empty(shape, device=x.device, dtype=x.dtype)

    def _qk_prologue_launch(
        kernel,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        gain: Tensor | None,
        out: Tensor,
        heads_major: bool,
        **meta,
    ) -> None:
        B, T, H, D = x.shape
        n_rows = B * T * H
        ob, ot, oh = out.stride(0), out.stride(2 if heads_major else 1), out.stride(1 if heads_major else 2)

        def grid(META: dict) -> tuple[int]:
            return (triton.cdiv(n_rows, META["BLOCK_ROWS"]),)

        kernel[grid](
            x,
            cos,
            sin,
            x if gain is None else gain,  # never read without a gain
            out,
            n_rows,
            T,
            cos.shape[1] - T,  # x's rows are the table's last T positions (last_rows)
            x.stride(1),
            cos.stride(1),
            cos.stride(3),
            sin.stride(1),
            sin.stride(3),
            ob,
            ot,
            oh,
            _RMS_EPS,
            H=H,
            D=D,
            HALF=cos.shape[3],
            HAS_GAIN=gain is not None,
            INTERPRET=_INTERPRET,
            BLOCK_HALF=triton.next_power_of_2(cos.shape[3]),
            BLOCK_REST=triton.next_power_of_2(max(D - 2 * cos.shape[3], 1)),
            **meta,
        )

    if _TRITON_OP and not _INTERPRET:

        @torch.library.triton_op("pgolf::qk_prologue", mutates_args=())
        def _qk_prologue_op(
            x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, heads_major: bool
        ) -> Tensor:
            out = _qk_prologue_new(x, heads_major)
            _qk_prologue_launch(
                torch.library.wrap_triton(_qk_prologue_tuned), x, cos, sin, gain, out, heads_major
            )
            return out

    else:  # opaque op with a shape-only fake, as for act_mm

        @torch.library.custom_op("pgolf::qk_prologue", mutates_args=())
        def _qk_prologue_op(
            x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, heads_major: bool
        ) -> Tensor:
            out = _qk_prologue_new(x, heads_major)
            _qk_prologue_launch(_qk_prologue_tuned, x, cos, sin, gain, out, heads_major)
            return out

        @_qk_prologue_op.register_fake
        def _qk_prologue_fake(
            x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, heads_major: bool
        ) -> Tensor:
            return _qk_prologue_new(x, heads_major)


class _LeakyReLU2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, slope: float) -> Tensor:
        h = h.contiguous()
        y = torch.empty_like(h)
        n = h.numel()
        _leaky2_fwd[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            h, y, n, slope, BLOCK=ELEMENTWISE_BLOCK, INTERPRET=_INTERPRET
        )
        ctx.save_for_backward(h)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        (h,) = ctx.saved_tensors
        g = g.contiguous()
        dh = torch.empty_like(h)
        n = h.numel()
        _leaky2_bwd[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            h, g, dh, n, ctx.slope, BLOCK=ELEMENTWISE_BLOCK, INTERPRET=_INTERPRET
        )
        return dh, None


class _SoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, targets: Tensor, cap: float) -> Tensor:
        x = x.contiguous()
        targets = targets.contiguous()
        N, V = x.shape
        loss = torch.empty(N, device=x.device, dtype=torch.float32)
        lse = torch.empty(N, device=x.device, dtype=torch.float32)
        _softcap_ce_fwd[(N,)](x, targets, loss, lse, V, x.stride(0), cap, BLOCK=CE_BLOCK)
        ctx.save_for_backward(x, targets, lse)
        ctx.cap = cap
        return loss

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        x, targets, lse = ctx.saved_tensors
        N, V = x.shape
        dx = torch.empty_like(x)
        g = g.float().contiguous()
        _softcap_ce_bwd[(N,)](x, targets, lse, g, dx, V, x.stride(0), ctx.cap, BLOCK=CE_BLOCK)
        return dx, None, None


def leaky_relu2(h: Tensor, slope: float) -> Tensor:
    """leaky_relu(h, slope)^2 in one kernel each way (slope 0: relu^2)."""
    return _LeakyReLU2.apply(h, float(slope))


def softcap_cross_entropy(raw_logits: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-token NLL (fp32, shape of `targets`) of cap*tanh(raw/cap) logits; raw (..., V)."""
    V = raw_logits.size(-1)
    loss = _SoftcapCE.apply(raw_logits.reshape(-1, V), targets.reshape(-1), float(cap))
    return loss.view(targets.shape)


def act_mm(h: Tensor, w: Tensor, slope: float) -> Tensor:
    """leaky_relu(h, slope)^2 @ w.T in one GEMM, the activation applied to h's tiles as they load.

    h (..., K), w (N, K) as an nn.Linear weight, same dtype; the activation is computed in fp32 and
    rounded to h's dtype before the product, as the unfused path does; fp32 accumulation; out
    (..., N) in h's dtype. Forward only (no autograd): the MLP calls it with grad disabled.
    """
    if w.dtype != h.dtype or w.dim() != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(
            f"act_mm: h {tuple(h.shape)} {h.dtype} and w {tuple(w.shape)} {w.dtype} do not match"
        )
    K = h.shape[-1]
    h2 = h.reshape(-1, K)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    out = torch.ops.pgolf.act_mm(h2, w, float(slope))
    return out.view(*h.shape[:-1], w.shape[0])


def mm_act(x: Tensor, w: Tensor, slope: float) -> Tensor:
    """leaky_relu(x @ w.T, slope)^2 in one GEMM, the activation applied in its epilogue.

    x (..., K), w (N, K) as an nn.Linear weight, same dtype; fp32 accumulation, the product rounded
    to x's dtype (the unfused path's stored h), then the activation in fp32, rounded to x's dtype
    again: out (..., N). The MLP's up-projection with the activation folded in, so the down
    projection stays a cuBLAS GEMM. Forward only (no autograd): the MLP calls it with grad disabled.
    """
    if w.dtype != x.dtype or w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"mm_act: x {tuple(x.shape)} {x.dtype} and w {tuple(w.shape)} {w.dtype} do not match"
        )
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.ops.pgolf.mm_act(x2, w, float(slope))
    return out.view(*x.shape[:-1], w.shape[0])


def qk_prologue(
    x: Tensor, cos: Tensor, sin: Tensor, rope_dims: int, gain: Tensor | None = None, heads_major: bool = False
) -> Tensor:
    """gain[h] * rope(rms_norm(x)) for q or k in one kernel: what `Attention` does between the
    projections and the attention kernel, as one read of x and one write of the result.

    x (B, T, H, D), the projection output viewed as heads; cos/sin (1, T', 1, rope_dims/2) as
    `rotary_tables` builds them, T' >= T: x's rows take the table's last T positions, as
    `last_rows(cos, rows)` gives the tail-only final block's queries. RMS norm over D (fp32, eps =
    fp32's epsilon, as F.rms_norm), half-split RoPE on the first `rope_dims` dims (apply_rotary),
    then the optional per-head gain (H,), all in fp32 and rounded once to x's dtype. Forward only.

    Returns (B, T, H, D). By default that is a contiguous tensor: the projection's own layout, and
    the one the unfused path hands SDPA. SDPA's flash and cuDNN kernels read the (B, H, T, D) view
    `_sdpa` makes of it through its strides (they need a unit last-dim stride; Inductor's SDPA
    stride constraint keeps an aligned, realized input as it is), and their output takes q's
    layout, so `y.reshape(B, T, H*D)` before W_o needs no copy either. `heads_major=True` instead
    writes a contiguous (B, H, T, D) buffer and returns its (B, T, H, D) view: the textbook SDPA
    layout, but the attention output then follows it and W_o's input needs a transposing copy.
    It is kept so the GPU benchmark can compare the two (bench/eval_speed.py, `fusedqkh`).
    """
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"qk_prologue: x must be (B, T, H, D) fp32/bf16/fp16, got {tuple(x.shape)} {x.dtype}"
        )
    B, T, H, D = x.shape
    half = rope_dims // 2
    table = (1, cos.shape[1], 1, half)
    if rope_dims % 2 or not 0 < rope_dims <= D or cos.dim() != 4 or cos.shape[1] < T:
        raise ValueError(
            f"qk_prologue: rope_dims {rope_dims} (even, <= D={D}) or cos {tuple(cos.shape)} is off"
        )
    if tuple(cos.shape) != table or tuple(sin.shape) != table:
        raise ValueError(f"qk_prologue: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must both be {table}")
    if gain is not None and tuple(gain.shape) != (H,):
        raise ValueError(f"qk_prologue: gain {tuple(gain.shape)} must have one entry per head ({H})")
    # the kernel addresses row (b, t) at (b*T + t) * stride(1) and dense heads within it
    if x.stride(3) != 1 or x.stride(2) != D or (B > 1 and x.stride(0) != T * x.stride(1)):
        x = x.contiguous()
    out = torch.ops.pgolf.qk_prologue(x, cos, sin, gain, heads_major)
    return out.transpose(1, 2) if heads_major else out
