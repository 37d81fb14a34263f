"""Transformer blocks of the record GPT family with functional weights (docs/techniques.md#model).

A block never assumes where its six matrices live: `GPT` passes them in as a `LayerWeights`
(slices of the 3-D banks, or the block's own per-layer linears), so one block implementation
serves both layouts and the two give the same numbers for the same weights.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.models.attention import causal_attention, exclusive_self_attention, last_rows_causal_attention
from pgolf.models.config import GPTModelConfig, switch_on
from pgolf.models.layers import CastedLinear, apply_partial_rotary, last_rows, rms_norm

if TYPE_CHECKING:  # imported on use only (GPT with model.doc_mask), so other runs never ship it
    from pgolf.models.docmask import DocMask


class LayerWeights(NamedTuple):
    q: Tensor  # (d, d)
    k: Tensor  # (kv_dim, d)
    v: Tensor  # (kv_dim, d)
    o: Tensor  # (d, d)
    up: Tensor  # (hidden, d)
    down: Tensor  # (d, hidden)


def own_linear(in_features: int, out_features: int, cfg: GPTModelConfig) -> CastedLinear:
    """A per-layer linear whose weight is left uninitialized (GPT initializes every block matrix
    itself, in one fixed order, so both layouts draw the same random numbers from the same seed);
    under model.init_rng_order=construction it draws nn.Linear's default init here, as PR #339's
    script's linears do (GPT overwrites it later; only the RNG position matters)."""
    if cfg.init_rng_order == "construction":
        return CastedLinear(in_features, out_features, bias=False)
    return torch.nn.utils.skip_init(
        CastedLinear, in_features, out_features, bias=False, device=torch.get_default_device()
    )


def optional_kernel(on: bool | str, switch: str, name: str, module: str = "kernels"):
    """pgolf.models.<module>.<name> when the config switch `model.<switch>` is on, else None.

    The module is imported only then, so runs without a fused switch never import (or ship) it;
    `kernels.require` raises a clear error naming the switch where the kernels cannot run.
    """
    if not switch_on(on):
        return None
    from pgolf.models import kernels

    kernels.require([f"model.{switch}"])
    return getattr(importlib.import_module(f"pgolf.models.{module}"), name)


def may_use_inference_kernels() -> bool:
    """Whether a forward-only fused kernel (model.fused_mlp_gemm/_up, fused_qk_rope) may run now.

    Only with grad off (the kernels have no backward), and never under a TorchFunctionMode in
    eager: such modes (GPTQ's Hessian collector, quant/hessian.py, also runs without grad) watch
    the functional calls, F.linear above all, which a fused kernel would hide from them.
    """
    if torch.is_grad_enabled():
        return False
    return torch.compiler.is_compiling() or not torch._C._is_torch_function_mode_enabled()


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on x in here: its autocast dtype where enabled."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def xsa_layers(cfg: GPTModelConfig) -> set[int]:
    if cfg.xsa_layers:
        return set(cfg.xsa_layers)
    return set(range(max(0, cfg.num_layers - cfg.xsa_last_n), cfg.num_layers))


class Attention(nn.Module):
    """QK-norm, partial RoPE, per-head q-gain, GQA causal attention, optional XSA and output gate."""

    def __init__(self, cfg: GPTModelConfig, layer: int, own_weights: bool):
        super().__init__()
        dim = cfg.model_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        self.rope_dims = cfg.rope_dims or self.head_dim
        if own_weights:  # registered first, as in the baseline, so state-dict order matches it
            kv_dim = self.num_kv_heads * self.head_dim
            self.c_q = own_linear(dim, dim, cfg)
            self.c_k = own_linear(dim, kv_dim, cfg)
            self.c_v = own_linear(dim, kv_dim, cfg)
            self.proj = own_linear(dim, dim, cfg)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.use_xsa = layer in xsa_layers(cfg)
        # q/k rms_norm + RoPE (+ q_gain) as one kernel each, used only with grad disabled
        self.fused_qk = optional_kernel(cfg.fused_qk_rope, "fused_qk_rope", "qk_prologue")
        # Test-time adapters (pgolf.ttt.lora): delta(kind, x) -> added to the q/k/v projections, and,
        # where delta.has("o") / has("mlp"), to the attention / MLP output (see Block). A plain
        # callable, not a module, so it never enters the state dict; None outside TTT. GPT can also
        # hand a block one per pass of a looped layer (GPT.pass_deltas), which takes precedence.
        self.delta = None
        # Output gates act per head on y, after XSA and before W_o; at most one (config validation).
        self.gate_window = cfg.gate_window
        self.out_gate_src_q = cfg.attn_out_gate_src == "q"
        self.attn_gate_proj: CastedLinear | None = None
        self.attn_gate_w: nn.Parameter | None = None
        self.gate_kind = "none"
        if cfg.attn_out_gate:  # g = 2 sigmoid(W x[:w]), W zero -> g = 1: the identity at init
            self.gate_kind = "out"
            self.attn_gate_proj = CastedLinear(cfg.gate_window, cfg.num_heads, bias=False)
            self.attn_gate_proj._zero_init = True
        elif cfg.gated_attn:  # g = sigmoid(W_g x), W_g ~ N(0, std^2): ~0.5 at init
            self.gate_kind = "dense"
            self.attn_gate_w = nn.Parameter(torch.empty(cfg.num_heads, dim, dtype=torch.float32))
            nn.init.normal_(self.attn_gate_w, std=cfg.gated_attn_init_std)
        elif cfg.sparse_attn_gate:  # g = sigmoid(s W_g x[:w]), zero init by default: 0.5 at init
            self.gate_kind = "sparse"
            self.gate_scale = cfg.sparse_attn_gate_scale
            self.attn_gate_w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.gate_window, dtype=torch.float32))
            if cfg.sparse_attn_gate_init_std > 0:
                nn.init.normal_(self.attn_gate_w, std=cfg.sparse_attn_gate_init_std)

    def _gate(self, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
        # Narrow slices are made contiguous so the gate is a plain GEMM under fullgraph compile.
        if self.gate_kind == "out":
            src = q_raw if self.out_gate_src_q else x
            g = 2.0 * torch.sigmoid(self.attn_gate_proj(src[..., : self.gate_window].contiguous()))
        elif self.gate_kind == "dense":
            g = torch.sigmoid(F.linear(x, self.attn_gate_w.to(x.dtype)))
        elif self.gate_kind == "sparse":
            gate_in = x[..., : self.gate_window].contiguous()
            g = torch.sigmoid(self.gate_scale * F.linear(gate_in, self.attn_gate_w.to(x.dtype)))
        else:
            return y
        return y * g[..., None]

    def forward(
        self,
        x: Tensor,
        w: LayerWeights,
        cos: Tensor,
        sin: Tensor,
        ve: Tensor | None = None,
        rows: int = 0,
        doc: DocMask | None = None,
        delta=None,
    ) -> Tensor:
        """Attention output for every position, or for the last `rows` only (keys/values still
        cover the whole sequence, so those rows get exactly the output they would get in full).
        With `doc` (model.doc_mask) no query attends to a key of another document. `delta`: this
        pass's test-time adapters (default: self.delta)."""
        delta = self.delta if delta is None else delta
        B, T, _ = x.shape
        xq = last_rows(x, rows)
        Tq = xq.size(1)
        q_raw = F.linear(xq, w.q.to(x.dtype))
        k = F.linear(x, w.k.to(x.dtype))
        v = F.linear(x, w.v.to(x.dtype))
        if delta is not None:
            q_raw, k, v = q_raw + delta("q", xq), k + delta("k", x), v + delta("v", x)
        q = q_raw.view(B, Tq, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if ve is not None:  # value embedding, added before the split into heads
            v = v + ve
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.fused_qk is not None and may_use_inference_kernels():
            # The kernel takes q's rows as the tables' last Tq positions: last_rows(cos, rows).
            # The gain is rounded to q's dtype as in the path below, where rms_norm returns q's
            # dtype (bf16) on CPU and on CUDA up to torch 2.11, and in the record scripts. (CUDA
            # autocast in torch >= 2.12 runs rms_norm in fp32, so there the eager path's gain is
            # fp32: the two then differ by the gain's bf16 rounding, at most 2^-9 relative.)
            q = self.fused_qk(q, cos, sin, self.rope_dims, self.q_gain.to(q.dtype))
            k = self.fused_qk(k, cos, sin, self.rope_dims)
        else:
            q = apply_partial_rotary(rms_norm(q), last_rows(cos, rows), last_rows(sin, rows), self.rope_dims)
            k = apply_partial_rotary(rms_norm(k), cos, sin, self.rope_dims)
            q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        if doc is not None:
            y = doc.attend_last_rows(q, k, v) if rows else doc.attend(q, k, v)
        else:
            y = last_rows_causal_attention(q, k, v) if rows else causal_attention(q, k, v)
        if self.use_xsa:
            y = exclusive_self_attention(y, last_rows(v, rows))
        y = self._gate(y, xq, q_raw)
        out = F.linear(y.reshape(B, Tq, -1), w.o.to(x.dtype))
        if delta is not None and delta.has("o"):  # O adapter: from the attention's (normalized) input
            out = out + delta("o", xq)
        return out


class MLP(nn.Module):
    """relu(x W_up)^2 W_down, or leaky_relu(x W_up, slope)^2 W_down.

    docs/techniques.md#leakyrelu-squared-mlp
    """

    def __init__(self, cfg: GPTModelConfig, own_weights: bool):
        super().__init__()
        if own_weights:
            hidden = int(cfg.mlp_mult * cfg.model_dim)
            self.fc = own_linear(cfg.model_dim, hidden, cfg)
            self.proj = own_linear(hidden, cfg.model_dim, cfg)
        self.leaky = cfg.activation == "leaky_relu2"
        self.negative_slope = cfg.negative_slope
        self.fused = optional_kernel(cfg.fused_mlp, "fused_mlp", "leaky_relu2")
        # the whole MLP with the activation in GEMM epilogues, used only with grad enabled
        self.fused_train = optional_kernel(
            cfg.fused_mlp_train, "fused_mlp_train", "mlp_train", "fused_mlp_train"
        )
        # act(h) @ W_down^T in one kernel, used only with grad disabled
        self.fused_gemm = optional_kernel(cfg.fused_mlp_gemm, "fused_mlp_gemm", "act_mm")
        # act(x @ W_up^T) in one kernel (the epilogue form), used only with grad disabled
        self.fused_up = optional_kernel(cfg.fused_mlp_up, "fused_mlp_up", "mm_act")

    def forward(self, x: Tensor, up: Tensor, down: Tensor) -> Tensor:
        slope = self.negative_slope if self.leaky else 0.0
        if self.fused_up is not None and may_use_inference_kernels():
            # a Triton op is not autocast-aware: cast its operands as F.linear's autocast would
            dt = autocast_dtype(x)
            return F.linear(self.fused_up(x.to(dt), up.to(dt), slope), down.to(x.dtype))
        if self.fused_train is not None and torch.is_grad_enabled():
            dt = autocast_dtype(x)
            return self.fused_train(x.to(dt), up.to(dt), down.to(dt), slope)
        h = F.linear(x, up.to(x.dtype))
        if self.fused_gemm is not None and may_use_inference_kernels():
            return self.fused_gemm(h, down.to(h.dtype), slope)  # h's dtype: bf16 under autocast
        if self.fused is not None:
            return F.linear(self.fused(h, slope), down.to(x.dtype))
        h = F.leaky_relu(h, self.negative_slope) if self.leaky else torch.relu(h)
        return F.linear(h.square(), down.to(x.dtype))


class Block(nn.Module):
    """Pre-norm block: optional resid mix with x0, LN scale 1/sqrt(i+1), per-channel branch scales.

    Sequential by default; the GPT-J parallel form (physical layers >= parallel_start_layer) feeds
    both branches the same normalized input: x + a*Attn(N(x)) + c*MLP(N(x)). The two-lane form is
    composed by `GPT` from `attn_branch`/`mlp_branch`, since it carries two streams between blocks.
    """

    def __init__(self, cfg: GPTModelConfig, layer: int, own_weights: bool):
        super().__init__()
        dim = cfg.model_dim
        self.attn = Attention(cfg, layer, own_weights)
        self.mlp = MLP(cfg, own_weights)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = (
            nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float()) if cfg.resid_mix else None
        )
        self.ln_factor = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.gptj = cfg.parallel_residual == "gptj" and layer >= cfg.parallel_start_layer

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        if self.resid_mix is None:
            return x
        m = self.resid_mix.to(x.dtype)
        return m[0] * x + m[1] * x0

    def norm(self, x: Tensor) -> Tensor:
        h = rms_norm(x)
        return h * self.ln_factor if self.ln_factor != 1.0 else h

    def attn_branch(
        self,
        h: Tensor,
        w: LayerWeights,
        cos: Tensor,
        sin: Tensor,
        ve: Tensor | None,
        rows: int = 0,
        doc: DocMask | None = None,
        delta=None,
    ) -> Tensor:
        return self.attn_scale.to(h.dtype) * self.attn(self.norm(h), w, cos, sin, ve, rows, doc, delta)

    def mlp_out(self, n: Tensor, w: LayerWeights, delta=None) -> Tensor:
        """The MLP on the normalized input n, plus the MLP test-time adapter's output (from n) if any."""
        out = self.mlp(n, w.up, w.down)
        delta = self.attn.delta if delta is None else delta
        if delta is not None and delta.has("mlp"):
            out = out + delta("mlp", n)
        return out

    def mlp_branch(self, h: Tensor, w: LayerWeights, delta=None) -> Tensor:
        return self.mlp_scale.to(h.dtype) * self.mlp_out(self.norm(h), w, delta)

    def forward(
        self,
        x: Tensor,
        x0: Tensor,
        w: LayerWeights,
        cos: Tensor,
        sin: Tensor,
        ve: Tensor | None = None,
        rows: int = 0,
        doc: DocMask | None = None,
        delta=None,
    ) -> Tensor:
        """The block's output for every position, or (rows > 0) for the last `rows` positions only:
        what scoring needs from the final layer, where no later layer reads the other positions.
        `delta`: this pass's test-time adapters (default: self.attn.delta)."""
        x = self.mix(x, x0)
        if self.gptj:
            n = self.norm(x)
            a = self.attn_scale.to(x.dtype) * self.attn(n, w, cos, sin, ve, rows, doc, delta)
            return (
                last_rows(x, rows)
                + a
                + self.mlp_scale.to(x.dtype) * self.mlp_out(last_rows(n, rows), w, delta)
            )
        x = last_rows(x, rows) + self.attn_branch(x, w, cos, sin, ve, rows, doc, delta)
        return x + self.mlp_branch(x, w, delta)
