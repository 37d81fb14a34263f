"""`model.fused_mlp_train`: the training MLP with its activation in GEMM epilogues, both ways.

`mlp_train(x, W_up, W_down, slope)` is leaky_relu(x W_up^T, slope)^2 W_down^T as an autograd
function. Its up-projection GEMM writes the pre-activation h and act(h) from one epilogue. Its
backward folds act'(h) into the epilogue of the GEMM dOut @ W_down, so neither the activation nor
its gradient takes a pass of its own over the (M x hidden) tensors. The down projection and the
weight and input gradients stay cuBLAS GEMMs. This is the form of PR #1775's training MLP kernel,
built on `pgolf.models.kernels`' GEMM tiles (`mm_act`'s main loop). A module of its own so that a
run without the switch neither imports nor ships it (docs/fused_mlp_gemm.md).

On Hopper, bf16 operands go through a second form of the same kernel: persistent (one program per
SM walks the output tiles) with TMA loads and stores, as #1775's own kernel does. On an H100 at
#1775's shapes the two launches take 0.987 ms against the pointer form's 1.041 (the script's own
kernel: 0.995), with outputs bit for bit equal to both (bench/mlp_train_forms.py).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pgolf.models.kernels import (
    _INTERPRET,
    _gemm_acc,
    _gemm_out,
    _mm_act_configs,
    _round_to,
    _store_tile,
    tl,
    triton,
)

try:  # Triton >= 3.4: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


@triton.jit
def _mlp_train_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    aux_ptr,
    M,
    stride_am,
    stride_wn,
    stride_wk,
    stride_om,
    slope,
    N: tl.constexpr,
    K: tl.constexpr,
    BACKWARD: tl.constexpr,
    DOT_F32: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One (BLOCK_M, BLOCK_N) tile of h = round(a @ W^T), then the epilogue:
    #   forward  (a = x, W = W_up):         out = h (the pre-activation), aux = act(h)
    #   backward (a = dOut, W = W_down^T):  out = h * act'(aux), aux = the saved pre-activation
    # out and aux are (M, N) with one row stride. act(h) = leaky_relu(h, slope)^2, so
    # act'(p) = 2p for p > 0 and 2 slope^2 p below: what the unfused path's pointwise kernels
    # compute from the stored GEMM outputs, in fp32, rounded once at the store.
    slope = tl.cast(slope, tl.float32)
    acc, rm, rn, rows_left, row0 = _gemm_acc(
        a_ptr, w_ptr, M, stride_am, stride_wn, stride_wk, N, K, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K
    )
    h = _round_to(acc, out_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    if BACKWARD:
        aux_ptrs = aux_ptr + row0 * stride_om + (rm[:, None] * stride_om + rn[None, :])
        live = (rm[:, None] < rows_left) & (rn[None, :] < N)
        pre = tl.load(aux_ptrs, mask=live, other=0.0).to(tl.float32)
        _store_tile(out_ptr, h * tl.where(pre > 0, 2.0 * pre, (2.0 * slope * slope) * pre),
                    row0, rm, rn, rows_left, N, stride_om, INTERPRET)  # fmt: skip
    else:
        _store_tile(out_ptr, h, row0, rm, rn, rows_left, N, stride_om, INTERPRET)
        y = tl.where(h > 0, h, h * slope)
        _store_tile(aux_ptr, y * y, row0, rm, rn, rows_left, N, stride_om, INTERPRET)


@triton.jit
def _mlp_train_tma_kernel(
    a_desc,
    w_desc,
    out_desc,
    aux_desc,
    M,
    N,
    K,
    slope,
    BACKWARD: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    # _mlp_train_kernel's tiles and epilogue, persistent and through TMA: program p computes output
    # tiles p, p + NUM_PROGRAMS, ... (N fastest, so neighbours share an `a` row block). W is read
    # as (N, K) tiles of W_up in the forward and as (K, N) tiles of W_down in the backward (so its
    # transpose needs no copy). The epilogue runs on two (BLOCK_M, BLOCK_N / 2) halves: a whole
    # bf16 tile staged for the TMA store would not fit in shared memory beside the main loop's
    # stages. TMA zero-fills loads past M, N or K and clips stores, so ragged shapes need no masks.
    slope = tl.cast(slope, tl.float32)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    HALF: tl.constexpr = BLOCK_N // 2
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        row = (tile // tiles_n) * BLOCK_M
        col = (tile % tiles_n) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = a_desc.load([row, k])
            b = w_desc.load([k, col]) if BACKWARD else w_desc.load([col, k]).T
            if INTERPRET:  # the interpreter's bf16 dot is not a GPU's: fp32 products, fp32 sums
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        for i in tl.static_range(2):
            h = _round_to(halves[i], tl.bfloat16, INTERPRET).to(tl.float32)
            if BACKWARD:
                pre = aux_desc.load([row, col + i * HALF]).to(tl.float32)
                dpre = h * tl.where(pre > 0, 2.0 * pre, (2.0 * slope * slope) * pre)
                out_desc.store([row, col + i * HALF], _round_to(dpre, tl.bfloat16, INTERPRET))
            else:
                out_desc.store([row, col + i * HALF], h.to(tl.bfloat16))
                y = tl.where(h > 0, h, h * slope)
                aux_desc.store([row, col + i * HALF], _round_to(y * y, tl.bfloat16, INTERPRET))


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of the TMA form, forward and backward: the
# tiles of #1775's kernel on H100 (the backward also loads its pre-activation halves, so one stage
# fewer); the interpreter's are small so the CPU tests cover several tiles and ragged edges.
_TMA_TILES = {False: (128, 256, 64, 4, 8), True: (128, 256, 64, 3, 8)}
_TMA_TILES_INTERPRET = (32, 32, 32, 1, 4)


# "auto": the TMA form on Hopper; the tests set "on" (in Triton's interpreter too) and "off" to
# check both forms against the same references wherever they run.
TMA_FORM = "auto"


@functools.cache
def _gpu(device_index: int) -> tuple[int, int]:
    """(compute capability major, SM count) of a GPU: read once per device, not per launch."""
    props = torch.cuda.get_device_properties(device_index)
    return props.major, props.multi_processor_count


def _tma_form(*tensors: Tensor) -> bool:
    """Whether the TMA form takes a launch over these 2-D operands and outputs: bf16 on a Hopper GPU
    (`TMA_FORM` "auto"), each row-major with 16-byte aligned start and row stride, as TMA
    addresses them."""
    if TMA_FORM == "off" or TensorDescriptor is None or any(t.dtype != torch.bfloat16 for t in tensors):
        return False
    if TMA_FORM == "auto":
        a = tensors[0]
        if _INTERPRET or not (a.is_cuda and _gpu(a.device.index or 0)[0] == 9):
            return False
    return all(
        t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
        for t in tensors
    )


def _mlp_train_tma_launch(
    a: Tensor, w: Tensor, out: Tensor, aux: Tensor, slope: float, backward: bool
) -> None:
    """out/aux (M, N) from a (M, K) and W: W_up (N, K) in the forward, W_down (K, N) in the backward."""
    M, K = a.shape
    N = w.shape[1] if backward else w.shape[0]
    bm, bn, bk, stages, warps = _TMA_TILES_INTERPRET if _INTERPRET else _TMA_TILES[backward]
    programs = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    # One program per SM; in the interpreter two, so the CPU tests walk several tiles a program.
    programs = min(programs, 2 if _INTERPRET else _gpu(a.device.index or 0)[1])
    _mlp_train_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(a, [bm, bk]),
        TensorDescriptor.from_tensor(w, [bk, bn] if backward else [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn // 2]),
        TensorDescriptor.from_tensor(aux, [bm, bn // 2]),
        M,
        N,
        K,
        slope,
        BACKWARD=backward,
        INTERPRET=_INTERPRET,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        NUM_PROGRAMS=programs,
        num_stages=stages,
        num_warps=warps,
    )


# Separate tuners for the two directions: the same (N, K) key, different epilogues.
_mlp_up_tuned = triton.autotune(configs=_mm_act_configs(), key=["N", "K"])(_mlp_train_kernel)
_mlp_dact_tuned = triton.autotune(configs=_mm_act_configs(), key=["N", "K"])(_mlp_train_kernel)


def _mlp_train_launch(
    kernel, a: Tensor, w_nk: Tensor, out: Tensor, aux: Tensor, slope: float, backward: bool
):
    """out/aux (M, N) from a (M, K) with unit column stride and W read as (N, K) through its strides."""
    M, K = a.shape
    N = w_nk.shape[0]

    def grid(META: dict) -> tuple[int]:
        return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)

    kernel[grid](
        a,
        w_nk,
        out,
        aux,
        M,
        a.stride(0),
        w_nk.stride(0),
        w_nk.stride(1),
        out.stride(0),
        slope,
        N=N,
        K=K,
        BACKWARD=backward,
        DOT_F32=a.dtype == torch.float32 or _INTERPRET,
        INTERPRET=_INTERPRET,
    )


def _mlp_up_act_impl(kernel, x: Tensor, w_up: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    pre, post = _gemm_out(x, w_up), _gemm_out(x, w_up)
    if _tma_form(x, w_up, pre, post):
        _mlp_train_tma_launch(x, w_up, pre, post, slope, backward=False)
    else:
        _mlp_train_launch(kernel, x, w_up, pre, post, slope, backward=False)
    return pre, post


def _mlp_dact_impl(kernel, g: Tensor, w_down: Tensor, pre: Tensor, slope: float) -> Tensor:
    dpre = torch.empty_like(pre)
    if _tma_form(g, w_down, dpre, pre):  # W_down (d, hidden) read as (K, N) tiles: no transpose
        _mlp_train_tma_launch(g, w_down, dpre, pre, slope, backward=True)
    else:
        _mlp_train_launch(kernel, g, w_down.t(), dpre, pre, slope, backward=True)  # W_down^T: (hidden, d)
    return dpre


# Opaque ops with shape-only fakes, never `triton_op`s: Inductor's analysis of which arguments a
# user kernel writes takes the backward launch as writing W_down (a leaf that requires grad), and the
# training graph then fails to compile (found on an H100 with torch 2.11). An opaque op declares
# that it mutates nothing; Inductor cannot fuse into these GEMMs either way.


@torch.library.custom_op("pgolf::mlp_up_act", mutates_args=())
def _mlp_up_act_op(x: Tensor, w_up: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    return _mlp_up_act_impl(_mlp_up_tuned, x, w_up, slope)


@_mlp_up_act_op.register_fake
def _mlp_up_act_fake(x: Tensor, w_up: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    return _gemm_out(x, w_up), _gemm_out(x, w_up)


@torch.library.custom_op("pgolf::mlp_dact", mutates_args=())
def _mlp_dact_op(g: Tensor, w_down: Tensor, pre: Tensor, slope: float) -> Tensor:
    return _mlp_dact_impl(_mlp_dact_tuned, g, w_down, pre, slope)


@_mlp_dact_op.register_fake
def _mlp_dact_fake(g: Tensor, w_down: Tensor, pre: Tensor, slope: float) -> Tensor:
    return torch.empty_like(pre)


class _FusedMLP(torch.autograd.Function):
    """leaky_relu(x @ W_up^T, slope)^2 @ W_down^T with the activation in GEMM epilogues: the forward
    writes the pre-activation and the activation from one GEMM, the backward folds act' into the
    GEMM that makes the activation's gradient. The down projection and the weight/input gradients
    are cuBLAS GEMMs. x (M, d), w_up (hidden, d), w_down (d, hidden), one dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, w_up: Tensor, w_down: Tensor, slope: float) -> Tensor:
        pre, post = torch.ops.pgolf.mlp_up_act(x, w_up, slope)
        ctx.save_for_backward(x, w_up, w_down, pre, post)
        ctx.slope = slope
        return post @ w_down.t()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, w_up, w_down, pre, post = ctx.saved_tensors
        need_x, need_up, need_down = ctx.needs_input_grad[:3]
        g = g.contiguous()
        # Only the gradients asked for: LoRA TTT freezes the weights, and an eager backward would
        # otherwise run both weight-gradient GEMMs for nothing (a compiled one drops them anyway).
        dpre = torch.ops.pgolf.mlp_dact(g, w_down, pre, ctx.slope) if need_x or need_up else None
        dx = dpre @ w_up if need_x else None
        dw_up = dpre.t() @ x if need_up else None
        dw_down = g.t() @ post if need_down else None
        return dx, dw_up, dw_down, None


def mlp_train(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float) -> Tensor:
    """The MLP leaky_relu(x @ W_up^T, slope)^2 @ W_down^T, differentiable, with the activation and
    its derivative in GEMM epilogues (model.fused_mlp_train). x (..., d); weights as nn.Linear's."""
    if (
        not (x.dtype == w_up.dtype == w_down.dtype)
        or w_up.shape[1] != x.shape[-1]
        or w_down.shape[1] != w_up.shape[0]
    ):
        raise ValueError(
            f"mlp_train: x {tuple(x.shape)} {x.dtype}, w_up {tuple(w_up.shape)} {w_up.dtype} and "
            f"w_down {tuple(w_down.shape)} {w_down.dtype} do not match"
        )
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = _FusedMLP.apply(x2, w_up, w_down, float(slope))
    return out.view(*x.shape[:-1], w_down.shape[0])
