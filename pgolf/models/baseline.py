"""The naive baseline GPT, numerically the same as the challenge's root script.

docs/techniques.md#baseline-gpt

Tied embedding, weightless RMSNorms, U-Net skips, per-channel resid mix, QK-norm + half-split
RoPE + per-head q-gain, GQA attention, relu^2 MLP, zero-init output projections, logit soft-cap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.contracts import SingleGraphModel
from pgolf.models.attention import causal_attention
from pgolf.models.config import BaselineModelConfig
from pgolf.models.layers import (
    CastedLinear,
    RotaryTables,
    apply_rotary,
    is_control,
    last_rows,
    mean_cross_entropy,
    rms_norm,
    token_cross_entropy,
)


class Attention(nn.Module):
    def __init__(self, cfg: BaselineModelConfig):
        super().__init__()
        dim, self.num_heads, self.num_kv_heads = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, kv_dim, bias=False)
        self.c_v = CastedLinear(dim, kv_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.delta = None  # test-time q/k/v adapter (pgolf.ttt.lora); a plain callable, None outside TTT

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if self.delta is not None:
            q, k, v = q + self.delta("q", x), k + self.delta("k", x), v + self.delta("v", x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_rotary(rms_norm(q), cos, sin)
        k = apply_rotary(rms_norm(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: BaselineModelConfig):
        super().__init__()
        hidden = cfg.mlp_mult * cfg.model_dim
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: BaselineModelConfig):
        super().__init__()
        dim = cfg.model_dim
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x), cos, sin)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class BaselineGPT(SingleGraphModel, nn.Module):
    def __init__(self, cfg: BaselineModelConfig):
        super().__init__()
        self.cfg = cfg
        L, dim = cfg.num_layers, cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, dim)
        self.num_encoder_layers = L // 2
        self.num_decoder_layers = L - self.num_encoder_layers
        self.skip_weights = nn.Parameter(
            torch.ones(min(self.num_encoder_layers, self.num_decoder_layers), dim, dtype=torch.float32)
        )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(L))
        self.rotary = RotaryTables(dim // cfg.num_heads, cfg.rope_base)
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(dim, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        self.head_delta = None  # test-time logit adapter (pgolf.ttt.lora); None outside TTT
        self._init_weights()

    def _init_weights(self) -> None:
        if self.cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.tied_embed_init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and getattr(m, "_zero_init", False):
                nn.init.zeros_(m.weight)

    def _logits(self, input_ids: Tensor, last: int = 0) -> Tensor:
        x = rms_norm(self.tok_emb(input_ids))
        x0 = x
        cos, sin = self.rotary(
            input_ids.size(1), self.cfg.model_dim // self.cfg.num_heads, self.cfg.rope_base, x.dtype
        )
        skips: list[Tensor] = []
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0, cos, sin)
            skips.append(x)
        for i in range(self.num_decoder_layers):
            if skips:  # LIFO: the last encoder output feeds the first decoder block
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = self.blocks[self.num_encoder_layers + i](x, x0, cos, sin)
        x = last_rows(x, last)  # only the head is skipped for the other rows: the baseline stays simple
        x = rms_norm(x)
        logits = F.linear(x, self.tok_emb.weight) if self.lm_head is None else self.lm_head(x)
        if self.head_delta is not None:
            logits = logits + self.head_delta(x)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (fp32 softmax over the soft-capped logits)."""
        return mean_cross_entropy(self._logits(input_ids), target_ids)

    def token_nll(self, input_ids: Tensor, target_ids: Tensor, last: int = 0) -> Tensor:
        """Per-token NLL in fp32, shape (B, T), or (B, last) for the last `last` positions: what
        evaluation sums for val_loss and val_bpb."""
        return token_cross_entropy(self._logits(input_ids, last), last_rows(target_ids, last))

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by optimizer role: the model says which is which, optimizers do not guess."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "matrix": [],
            "scalar": [],
            "embed": [],
            "head": [],
        }
        for name, p in self.named_parameters():
            if name == "tok_emb.weight":
                groups["embed"].append((name, p))
            elif name.startswith("lm_head."):
                groups["head"].append((name, p))
            elif name.startswith("blocks.") and p.ndim == 2 and not is_control(name):
                groups["matrix"].append((name, p))
            else:
                groups["scalar"].append((name, p))
        return groups


def build(cfg: BaselineModelConfig) -> BaselineGPT:
    return BaselineGPT(cfg)
