"""pgolf's LeakyReLU^2 MLP computes the function of PR #1775's fused training kernel, bit for bit.

The PR's linear_leaky_relu_square kernel (train_gpt.py), written out plainly in bf16: the up GEMM
accumulates in fp32 and is rounded to bf16 (`pre`); the forward stores post = where(pre > 0, pre,
0.5 * pre)^2 rounded to bf16, and the down GEMM reads post; the backward rounds g = grad_out @ W_down
to bf16 and returns dpre = g * where(pre > 0, 2 * pre, 0.5 * pre) rounded to bf16. Its eval path
(no kernel) is F.leaky_relu(F.linear(x, W_up), 0.5).square(). Given the same GEMM outputs, pgolf's
eager MLP (model.fused_mlp=false, the pr1775 preset) and its elementwise kernel (model.fused_mlp)
must give exactly these bits; only GEMM accumulation order can differ between the two scripts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf.models import kernels
from pgolf.models.blocks import MLP
from pgolf.models.config import BankedGPTConfig

SLOPE = 0.5  # the kernel's constants: 0.5 * c forward, 2.0 * pre / 0.5 * pre backward
REASON = kernels.unavailable_reason()


def script_forward(pre: torch.Tensor) -> torch.Tensor:
    p = pre.float()
    a = torch.where(p > 0, p, 0.5 * p)
    return (a * a).to(torch.bfloat16)


def script_backward(pre: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p = pre.float()
    return (g.float() * torch.where(p > 0, 2.0 * p, 0.5 * p)).to(torch.bfloat16)


def bf16_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(4, 9, 260, generator=g).to(torch.bfloat16)
    pre[0, 0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 0.5, -0.5])  # zeros, tiny, exact
    grad = torch.randn(4, 9, 260, generator=g).to(torch.bfloat16)
    return pre, grad


def test_eager_mlp_activation_is_the_scripts_kernel():
    """model.fused_mlp=false: pgolf's autograd path, forward and backward, exactly the kernel's."""
    pre, grad = bf16_case()
    h = pre.clone().requires_grad_(True)
    post = F.leaky_relu(h, SLOPE).square()  # the expression in pgolf.models.blocks.MLP.forward
    post.backward(grad)
    assert post.dtype == torch.bfloat16
    assert torch.equal(post, script_forward(pre))
    assert torch.equal(h.grad, script_backward(pre, grad))


@pytest.mark.skipif(REASON is not None, reason=f"fused kernels unavailable: {REASON}")
def test_fused_mlp_kernel_is_the_scripts_kernel():
    """model.fused_mlp=true: the elementwise Triton kernel, forward and backward."""
    pre, grad = bf16_case(1)
    h = pre.clone().requires_grad_(True)
    post = kernels.leaky_relu2(h, SLOPE)
    post.backward(grad)
    assert torch.equal(post, script_forward(pre))
    assert torch.equal(h.grad, script_backward(pre, grad))


def test_mlp_module_rounds_the_up_projection_before_the_activation():
    """Where the product is taken: the activation reads the bf16 up-projection (the kernel's
    `pre`), and the down projection reads the bf16 `post`, under autocast as in training."""
    cfg = BankedGPTConfig(
        vocab_size=64, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=4.0,
        activation="leaky_relu2", negative_slope=SLOPE,
    )  # fmt: skip
    mlp = MLP(cfg, own_weights=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 32, generator=g)
    up, down = torch.randn(128, 32, generator=g) / 6, torch.randn(32, 128, generator=g) / 11
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mlp(x, up, down)
        pre = F.linear(x, up)  # bf16 under autocast
        want = F.linear(script_forward(pre), down)
    assert pre.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert torch.equal(got, want)
