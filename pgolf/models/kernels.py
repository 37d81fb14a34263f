"""Optional fused Triton kernels behind model switches (TECHNIQUES §2.14, R0410's fused kernels).

* `model.fused_mlp`: the MLP activation leaky_relu(h, slope)^2 (relu^2 with slope 0), forward and
  backward in one elementwise pass each, computed in fp32 and stored in h's dtype.
* `model.fused_ce`: soft-capped cross entropy. From the raw logits x (N, V), z = cap*tanh(x/cap);
  the loss is logsumexp(z) - z[target]. The forward streams each row once (online softmax) and
  keeps only the row's logsumexp for the backward, which writes
  dx = g * (softmax(z) - onehot) * (1 - tanh^2) without materializing z or the fp32 logits.

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

    @triton.jit
    def _leaky2_fwd(h_ptr, y_ptr, n, slope, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.where(h > 0, h, h * slope)
        tl.store(y_ptr + offs, (a * a).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _leaky2_bwd(h_ptr, g_ptr, dh_ptr, n, slope, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        pos = h > 0
        a = tl.where(pos, h, h * slope)
        dh = 2.0 * a * tl.where(pos, 1.0, slope) * g
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _softcap_ce_fwd(x_ptr, t_ptr, loss_ptr, lse_ptr, V, stride, cap, BLOCK: tl.constexpr):
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
    def _softcap_ce_bwd(x_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr, V, stride, cap, BLOCK: tl.constexpr):
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


class _LeakyReLU2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, slope: float) -> Tensor:
        h = h.contiguous()
        y = torch.empty_like(h)
        n = h.numel()
        _leaky2_fwd[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](h, y, n, slope, BLOCK=ELEMENTWISE_BLOCK)
        ctx.save_for_backward(h)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        (h,) = ctx.saved_tensors
        g = g.contiguous()
        dh = torch.empty_like(h)
        n = h.numel()
        _leaky2_bwd[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](h, g, dh, n, ctx.slope, BLOCK=ELEMENTWISE_BLOCK)
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
