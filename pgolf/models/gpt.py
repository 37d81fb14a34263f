"""The record GPT family (docs/techniques.md#model): one stack, banked or per-layer weights.

`model=banked` keeps the block matrices in four 3-D fp32 banks and hands each layer its slices;
`model=layered` gives every block its own linears. Everything else (embedding add-ons, U-Net skips,
parallel residuals, depth recurrence, gates, backout) is the same code, so the two layouts compute
the same function of the same weights, and `export_state_dict()` gives both the same per-layer
2-D state dict for quantization.

Hooks the trainer uses: `param_groups()` (optimizer roles), `export_state_dict()` /
`load_export_state_dict()` (artifact), `graph_variants()` / `set_graph_variant()` (compile priming)
and `on_progress(frac)` (host-side switches during training, e.g. turning the loops on).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.models.banks import BANKS, bank_slots, rebank, unbank
from pgolf.models.blocks import Block, LayerWeights, optional_kernel
from pgolf.models.config import FUSED_SWITCHES, GPTModelConfig, switch_on
from pgolf.models.embeddings import BigramHash, SmearGateV2, SmearGateV3, ValueEmbedding
from pgolf.models.layers import (
    CastedLinear,
    RotaryTables,
    last_rows,
    mean_cross_entropy,
    ntk_rope_base,
    rms_norm,
    token_cross_entropy,
)
from pgolf.models.recurrence import layer_plan

if TYPE_CHECKING:  # imported on use only (model.doc_mask), so other runs never ship it
    from pgolf.models.docmask import DocMask

# Embedding tables share the token embedding's optimizer role (tok_emb, bigram and VE tables, as the
# 2026-03-23 record groups them).
EMBED_TABLES = ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight")
LOOP_OFF, LOOP_ON, STATIC = "loop_off", "loop_on", "static"
LANE_FORMS = ("two_lane", "two_lane_seq", "split_lane")  # parallel residuals that carry two streams
# The per-layer linears of a block's six matrices, in LayerWeights order (q, k, v, o, up, down).
LAYER_MATRICES = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")


class GPT(nn.Module):
    def __init__(self, cfg: GPTModelConfig, banked: bool, init: bool = True):
        super().__init__()
        self.cfg, self.banked = cfg, banked
        L, dim, V = cfg.num_layers, cfg.model_dim, cfg.vocab_size
        head_dim = dim // cfg.num_heads
        kv_dim = cfg.num_kv_heads * head_dim
        hidden = int(cfg.mlp_mult * dim)
        self.num_layers = L
        self.rope_dims = cfg.rope_dims or head_dim
        # the tables of the model's own base and dtypes, cached (_hidden picks the variant per call)
        self.rotary = RotaryTables(
            self.rope_dims,
            cfg.rope_base,
            torch.bfloat16 if cfg.rope_table_dtype == "bfloat16" else torch.float32,
            torch.bfloat16 if cfg.rope_table_dtype == "bfloat16_inv_freq" else None,
        )
        # A module applied to the block matrices of training forwards (set_weight_hook); None: off.
        self.weight_hook: nn.Module | None = None

        self.tok_emb = nn.Embedding(V, dim)
        self.bigram = (
            BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, dim) if cfg.bigram_vocab_size else None
        )
        self.smear: SmearGateV2 | SmearGateV3 | None = None
        if cfg.smear_gate == "v2":
            self.smear = SmearGateV2(dim, cfg.smear_bos_fix, cfg.bos_id)
        elif cfg.smear_gate == "v3":
            self.smear = SmearGateV3(cfg.gate_window, cfg.smear_bos_fix, cfg.bos_id)

        # Layer plans of both graph variants; skip parameters are sized for the deeper (looped) one
        # and the plain plan uses the first of them (as the 2026-04-09 record does).
        plans = [
            layer_plan(L, cfg.num_loops, cfg.loop_start, cfg.loop_end, looping) for looping in (False, True)
        ]
        self.enc_plain, self.dec_plain = plans[0].encoder, plans[0].decoder
        self.enc_loop, self.dec_loop = plans[1].encoder, plans[1].decoder
        self.num_skips = max(p.num_skips for p in plans) if cfg.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, dim)) if cfg.unet_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, dim)) if cfg.skip_gates_enabled else None
        # Python bool read by forward: torch.compile guards on it, so each value gets its own graph,
        # compiled during priming (graph_variants); on_progress flips it without a recompile.
        self.looping = cfg.num_loops > 0 and cfg.enable_looping_at <= 0.0

        self.blocks = nn.ModuleList(Block(cfg, i, own_weights=not banked) for i in range(L))
        # registered after the blocks, as the records do: parameters() order is the grad clip's
        # reduction order (OptimizerBundle.all_params), so this keeps their clip bit for bit
        self.ve_shared = ValueEmbedding(V, cfg.ve_dim, kv_dim) if cfg.ve_enabled else None
        self.ve_index = {layer: k for k, layer in enumerate(cfg.ve_layers)} if cfg.ve_enabled else {}
        self.ve_layer_scales = nn.ParameterList(
            nn.Parameter(torch.ones(1, dtype=torch.float32)) for _ in self.ve_index
        )
        if banked:
            # fp32 banks, filled by _init_weights
            self.qo_bank = nn.Parameter(torch.empty(2 * L, dim, dim))
            self.kv_bank = nn.Parameter(torch.empty(2 * L, kv_dim, dim))
            self.mlp_up_bank = nn.Parameter(torch.empty(L, hidden, dim))
            self.mlp_down_bank = nn.Parameter(torch.empty(L, dim, hidden))

        # Two-stream forms (docs/techniques.md#parallel-residuals): two_lane (concurrent reads),
        # two_lane_seq (sequential) and split_lane. Per physical layer: resid lambdas (L, 2) and post lambdas
        # (L, 2, 2) indexed [source sub-block (attn, mlp), destination lane (0, 1)].
        self.lane_form = cfg.parallel_residual if cfg.parallel_residual in LANE_FORMS else None
        self.two_lane = self.lane_form == "two_lane"
        if self.lane_form in ("two_lane", "two_lane_seq"):
            # concurrent: resid per lane, init 1.1; sequential: resid per sub-block step, init sqrt(1.1)
            init = 1.1 if self.two_lane else math.sqrt(1.1)
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), init))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
        # learned final merge m * lane0 + (1 - m) * lane1, m init 0.5 (split_lane's lane_merge)
        self.lane_merge = (
            nn.Parameter(torch.tensor(0.5, dtype=torch.float32))
            if cfg.parallel_final_lane == "learned"
            else None
        )
        self.backout_lambda = (
            nn.Parameter(torch.tensor(cfg.backout_lambda_init, dtype=torch.float32)) if cfg.backout else None
        )
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(dim, V, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        self._export_keys: list[str] | None = None
        self._fused_ce = optional_kernel(cfg.fused_ce, "fused_ce", "softcap_cross_entropy")
        # what each fused-kernel switch resolved to (`auto` decided here): the run log and result.json
        self.fused_kernels = {k: switch_on(getattr(cfg, k)) for k in FUSED_SWITCHES}
        self.head_delta = None  # test-time logit adapter (pgolf.ttt.lora); a plain callable, None outside TTT
        # Test-time adapters per executed block pass (pgolf.ttt.lora, ttt.per_pass): entry s serves
        # the s-th block run by the forward (block_passes()), so each pass of a looped layer gets its
        # own; None outside TTT (blocks then use their attn.delta)
        self.pass_deltas: list | None = None
        self._doc_mask = None  # the DocMask class under model.doc_mask, imported only then
        self._doc_cap: int | None = None  # doc_masked(max_len=...): the length cap inside, else doc_max_len
        if cfg.doc_mask:
            from pgolf.models.docmask import DocMask

            self._doc_mask = DocMask
        if cfg.param_order:
            self._register_first(cfg.param_order)
        if init:
            self._init_weights()

    def _register_first(self, names: list[str]) -> None:
        """model.param_order: these own parameters (those this model has) first, in that order."""
        own = self._parameters
        first = {n: own[n] for n in names if own.get(n) is not None}
        rest = {n: p for n, p in own.items() if n not in first}
        own.clear()
        own.update({**first, **rest})

    # ------------------------------------------------------------------------------ weights
    def set_weight_hook(self, hook: nn.Module | None) -> None:
        """Run every layer's six block matrices through `hook` in training forwards: it gets them in
        `LayerWeights` order (export names: `weight_hook_names()`) and returns the six to use.
        Late QAT's fake quantization (pgolf.quant.qat) installs one before the first trace, so it
        is part of the compiled graph; eval forwards never see it. A submodule, so its buffers
        follow the model's device; it holds no persistent state, so state dicts are unchanged."""
        self.weight_hook = hook

    def weight_hook_names(self) -> list[str]:
        """The export names of layer 0's matrices, in the order the weight hook gets them."""
        return [f"blocks.0.{name}.weight" for name in LAYER_MATRICES]

    def layer_weights(self, i: int) -> LayerWeights:
        w = self._layer_weights(i)
        if self.weight_hook is not None and self.training:
            return LayerWeights(*self.weight_hook(w))
        return w

    def _layer_weights(self, i: int) -> LayerWeights:
        if self.banked:
            n = self.num_layers
            return LayerWeights(
                self.qo_bank[i],
                self.kv_bank[i],
                self.kv_bank[n + i],
                self.qo_bank[n + i],
                self.mlp_up_bank[i],
                self.mlp_down_bank[i],
            )
        a, m = self.blocks[i].attn, self.blocks[i].mlp
        return LayerWeights(
            a.c_q.weight, a.c_k.weight, a.c_v.weight, a.proj.weight, m.fc.weight, m.proj.weight
        )

    @torch.no_grad()
    def _init_weights(self) -> None:
        cfg = self.cfg
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.tied_embed_init_std)
        proj_scale = 1.0 / math.sqrt(2 * self.num_layers)
        if cfg.init_rng_order == "construction":
            self._init_in_module_order(proj_scale)
            return
        # Block matrices in one fixed order (the 2026-03-23 record's: q, o, k, v, up, down per layer),
        # whatever the layout, so banked and per-layer models built from one seed hold identical weights.
        for i in range(self.num_layers):
            w = self.layer_weights(i)
            for t, is_proj in zip(
                (w.q, w.o, w.k, w.v, w.up, w.down), (False, True, False, False, False, True)
            ):
                if is_proj and cfg.zero_init_proj:
                    t.zero_()  # the 1/sqrt(2L) projection scale would leave it zero
                elif cfg.ortho_init:  # OrthoInit; projections additionally scaled by 1/sqrt(2L)
                    nn.init.orthogonal_(t, gain=1.0)
                    if is_proj:
                        t.mul_(proj_scale)
                else:  # nn.Linear's default, as the baseline's linears get
                    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        block_mats = {n for names in bank_slots(self.num_layers).values() for n in names}
        # Other linears (bigram/VE projections, gates, untied head): zero-flagged ones stay zero;
        # with OrthoInit the rest with both dims >= 64 become orthogonal (the 2026-03-23 record's init loop).
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and f"{name}.weight" not in block_mats:
                if getattr(m, "_zero_init", False):
                    nn.init.zeros_(m.weight)
                elif cfg.ortho_init and min(m.weight.shape) >= 64:
                    nn.init.orthogonal_(m.weight, gain=1.0)
                    if cfg.bigram_proj_scaled_init and name == "bigram.proj":
                        m.weight.mul_(proj_scale)

    def _init_in_module_order(self, proj_scale: float) -> None:
        """PR #339's init loop (model.init_rng_order=construction), after its tok_emb draw: one
        pass over named_modules(), so the bigram projection is drawn before the block linears, and
        per layer q, k, v, up (the zero projections draw nothing). Its rule: flagged linears and the
        block projections become zero; the others with both dims >= 64 orthogonal, every `*.proj`
        among them times 1/sqrt(2L); the rest keep the default init they drew at construction."""
        cfg = self.cfg
        for name, m in self.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            block_proj = name.startswith("blocks.") and name.endswith((".attn.proj", ".mlp.proj"))
            if getattr(m, "_zero_init", False) or (block_proj and cfg.zero_init_proj):
                nn.init.zeros_(m.weight)
            elif cfg.ortho_init and min(m.weight.shape) >= 64:
                nn.init.orthogonal_(m.weight, gain=1.0)
                if block_proj or (cfg.bigram_proj_scaled_init and name == "bigram.proj"):
                    m.weight.mul_(proj_scale)

    # ------------------------------------------------------------------------------ forward
    def _embed(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        if isinstance(self.smear, SmearGateV3):  # v3 smears the raw embedding ...
            x = self.smear(x, ids)
        x = rms_norm(x)
        if isinstance(self.smear, SmearGateV2):  # ... v2 the normalized one
            x = self.smear(x, ids)
        return x

    def _merge_skip(self, x: Tensor, skip: Tensor, k: int) -> Tensor:
        scaled = self.skip_weights[k].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[k].to(x.dtype)))

    def _two_lane(
        self,
        i: int,
        lanes: tuple[Tensor, Tensor],
        x0: Tensor,
        cos: Tensor,
        sin: Tensor,
        ve: Tensor | None,
        doc: DocMask | None = None,
        delta=None,
    ) -> tuple[Tensor, Tensor]:
        """Concurrent two-lane block (`two_lane`): attention reads resid-mix(lane0, x0), the MLP reads
        lane1, both from the pre-update lanes; each lane gets a learned mix of both outputs."""
        lane0, lane1 = lanes
        b, w = self.blocks[i], self.layer_weights(i)
        a = b.attn_branch(b.mix(lane0, x0), w, cos, sin, ve, doc=doc, delta=delta)
        m = b.mlp_branch(lane1, w, delta)
        r = self.parallel_resid_lambdas[i].to(lane0.dtype)
        p = self.parallel_post_lambdas[i].to(lane0.dtype)
        return r[0] * lane0 + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m

    def _two_lane_seq(
        self,
        i: int,
        lanes: tuple[Tensor, Tensor],
        x0: Tensor,
        cos: Tensor,
        sin: Tensor,
        ve: Tensor | None,
        doc: DocMask | None = None,
        delta=None,
    ) -> tuple[Tensor, Tensor]:
        """Sequential two-lane block (`two_lane_seq`): attention reads resid-mix(lane0, x0) and writes both
        lanes; then the MLP reads resid-mix(lane1, x0), which already holds this attention output,
        and writes both lanes. The lanes themselves are never replaced by their mixed reads."""
        lane0, lane1 = lanes
        b, w = self.blocks[i], self.layer_weights(i)
        r = self.parallel_resid_lambdas[i].to(lane0.dtype)
        p = self.parallel_post_lambdas[i].to(lane0.dtype)
        a = b.attn_branch(b.mix(lane0, x0), w, cos, sin, ve, doc=doc, delta=delta)
        lane0, lane1 = r[0] * lane0 + p[0, 0] * a, r[0] * lane1 + p[0, 1] * a
        m = b.mlp_branch(b.mix(lane1, x0), w, delta)
        return r[1] * lane0 + p[1, 0] * m, r[1] * lane1 + p[1, 1] * m

    def _split_lane(
        self,
        i: int,
        lanes: tuple[Tensor, Tensor],
        x0: Tensor,
        cos: Tensor,
        sin: Tensor,
        ve: Tensor | None,
        doc: DocMask | None = None,
        delta=None,
    ) -> tuple[Tensor, Tensor]:
        """Split lanes (`split_lane`): the attention sub-block alone on lane0 (resid-mixed with x0, as
        a sequential block does), the MLP sub-block alone on lane1; the lanes never exchange."""
        lane0, lane1 = lanes
        b, w = self.blocks[i], self.layer_weights(i)
        h = b.mix(lane0, x0)
        a = b.attn_branch(h, w, cos, sin, ve, doc=doc, delta=delta)
        return h + a, lane1 + b.mlp_branch(lane1, w, delta)

    def _lane_block(
        self,
        i: int,
        lanes: tuple[Tensor, Tensor],
        x0: Tensor,
        cos: Tensor,
        sin: Tensor,
        ve: Tensor | None,
        doc: DocMask | None = None,
        delta=None,
    ) -> tuple[Tensor, Tensor]:
        if self.lane_form == "two_lane_seq":
            return self._two_lane_seq(i, lanes, x0, cos, sin, ve, doc, delta)
        if self.lane_form == "split_lane":
            return self._split_lane(i, lanes, x0, cos, sin, ve, doc, delta)
        return self._two_lane(i, lanes, x0, cos, sin, ve, doc, delta)

    def _lane_out(self, lanes: tuple[Tensor, Tensor]) -> Tensor:
        mode = self.cfg.parallel_final_lane
        if self.lane_merge is not None:
            m = self.lane_merge.to(lanes[0].dtype)
            return m * lanes[0] + (1 - m) * lanes[1]
        return lanes[0] if mode == "attn" else lanes[1] if mode == "mlp" else 0.5 * (lanes[0] + lanes[1])

    def _hidden(self, ids: Tensor, last: int = 0) -> Tensor:
        """Final normalized hidden states, (B, T, d); with last > 0 only those of the last `last`
        positions, the final block then computing its queries and MLP for those rows alone."""
        x = self._embed(ids)
        x0 = x
        T = ids.size(1)
        cfg = self.cfg
        # model.doc_mask: built once per forward from the ids, on the device, shared by every layer
        cap = cfg.doc_max_len if self._doc_cap is None else self._doc_cap
        doc = self._doc_mask(ids, cfg.bos_id, cap) if self._doc_mask is not None else None
        train_len = cfg.rope_train_seq_len
        # NTK rescaling is for attention spans past the RoPE train length; under the document mask
        # with a length cap the span is at most doc_max_len, however long the packed row is
        span = min(T, cap) if doc is not None and cap > 0 else T
        base = ntk_rope_base(cfg.rope_base, self.rope_dims, span, train_len)
        # the records' bf16 tables apply where they use the cast buffer: up to the RoPE train length
        # (past it they recompute an NTK inv_freq in fp32)
        bf16_tables = self.cfg.rope_table_dtype == "bfloat16" and (train_len <= 0 or T <= train_len)
        table = torch.bfloat16 if bf16_tables else torch.float32
        # bfloat16_inv_freq: the cast buffer's frequencies, positions in fp32 (an NTK base is fp32)
        bf16_freq = self.cfg.rope_table_dtype == "bfloat16_inv_freq" and base == cfg.rope_base
        freq = torch.bfloat16 if bf16_freq else None
        cos, sin = self.rotary(T, self.rope_dims, base, x.dtype, table, freq)
        ve_base = self.ve_shared(ids) if self.ve_shared is not None else None

        def ve(i: int) -> Tensor | None:
            k = self.ve_index.get(i)
            return None if k is None else ve_base * self.ve_layer_scales[k].to(ve_base.dtype)

        looping = self.looping
        encoder, decoder = (self.enc_loop, self.dec_loop) if looping else (self.enc_plain, self.dec_plain)
        backout_at = len(encoder) if self.cfg.backout_layer < 0 else self.cfg.backout_layer
        h_mid: Tensor | None = None
        # Once the lanes have started they carry the stream to the end (with a looped plan whose
        # physical order dips below the start again, the records would fall back to a stale x).
        lanes: tuple[Tensor, Tensor] | None = None
        pruned = False  # True once the final block has kept only the last `last` rows
        start = self.cfg.parallel_start_layer
        seq = self.lane_form == "two_lane_seq"
        skips: list[Tensor | tuple[Tensor, Tensor]] = []
        passes = self.pass_deltas

        def delta(s: int):  # the test-time adapters of the s-th executed block, if per pass
            return None if passes is None else passes[s]

        for n, i in enumerate(encoder, start=1):
            d = delta(n - 1)
            if seq and (lanes is not None or i >= start):  # two_lane_seq's lanes may start in the encoder
                lanes = self._lane_block(i, (x, x) if lanes is None else lanes, x0, cos, sin, ve(i), doc, d)
            else:
                x = self.blocks[i](x, x0, self.layer_weights(i), cos, sin, ve(i), doc=doc, delta=d)
            if self.num_skips:
                skips.append(x if lanes is None else lanes)  # a two-lane skip returns lane by lane
            if n == backout_at:
                h_mid = x if lanes is None else self._lane_out(lanes)
        for k, i in enumerate(decoder):
            d = delta(len(encoder) + k)
            skip = skips.pop() if k < self.num_skips and skips else None  # LIFO U-Net
            if self.lane_form is not None and lanes is None and i >= start:
                if self.lane_form == "split_lane" and skip is not None:
                    x, skip = self._merge_skip(x, skip, k), None  # split_lane: into the stream, then split
                lanes = (x, x)  # from the first decoder layer at or past the start: two lanes
            if lanes is None:
                if skip is not None:
                    x = self._merge_skip(x, skip, k)
                rows = last if k == len(decoder) - 1 else 0
                x = self.blocks[i](x, x0, self.layer_weights(i), cos, sin, ve(i), rows, doc, d)
                pruned = rows > 0
            else:
                if skip is not None:
                    if seq:  # two_lane_seq: into both lanes (each its own lane of a two-lane skip)
                        s0, s1 = skip if isinstance(skip, tuple) else (skip, skip)
                        lanes = (self._merge_skip(lanes[0], s0, k), self._merge_skip(lanes[1], s1, k))
                    else:  # split_lane, two_lane: into the attention lane only
                        lanes = (self._merge_skip(lanes[0], skip, k), lanes[1])
                lanes = self._lane_block(i, lanes, x0, cos, sin, ve(i), doc, d)
            if len(encoder) + k + 1 == backout_at:
                h_mid = x if lanes is None else self._lane_out(lanes)
        if lanes is not None:
            x = self._lane_out(lanes)
        if not pruned:  # two-lane forms (and a model with no decoder) prune at the end
            x = last_rows(x, last)
        if self.backout_lambda is not None:
            # Backout (PR #339): remove lambda * h_mid from the final stream *before* the final
            # RMSNorm, as modded-nanogpt's backout does. The norm then rescales what remains, so
            # the head always sees a unit-RMS vector; subtracting after the norm would hand it an
            # unnormalized one whose scale drifts with lambda.
            x = x - self.backout_lambda.to(x.dtype) * last_rows(h_mid, last)
        return rms_norm(x)

    def _raw_logits(self, ids: Tensor, last: int = 0) -> Tensor:
        x = self._hidden(ids, last)
        logits = F.linear(x, self.tok_emb.weight) if self.lm_head is None else self.lm_head(x)
        if self.head_delta is not None:  # test-time adapter on the logits (pgolf.ttt.lora), before the cap
            logits = logits + self.head_delta(x)
        return logits

    def _logits(self, ids: Tensor, last: int = 0) -> Tensor:
        logits = self._raw_logits(ids, last)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (fp32 softmax)."""
        if self._fused_ce is not None:
            return self._fused_ce(self._raw_logits(input_ids), target_ids, self.cfg.logit_softcap).mean()
        logits = self._logits(input_ids)
        loss = mean_cross_entropy(logits, target_ids)
        if self.cfg.z_loss:  # training only: token_nll, which evaluation scores with, has no z-loss
            loss = loss + self.cfg.z_loss * logits.float().logsumexp(-1).square().mean()
        return loss

    def token_nll(self, input_ids: Tensor, target_ids: Tensor, last: int = 0) -> Tensor:
        """Per-token NLL in fp32, shape (B, T); with last > 0 only for the last `last` positions,
        shape (B, last), skipping the work no scored position depends on (the final block's
        queries, MLP and head at the other positions). Sliding eval scores only a window's tail."""
        target_ids = last_rows(target_ids, last)
        if self._fused_ce is not None:
            return self._fused_ce(self._raw_logits(input_ids, last), target_ids, self.cfg.logit_softcap)
        return token_cross_entropy(self._logits(input_ids, last), target_ids)

    # ------------------------------------------------------------------------------ trainer hooks
    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Optimizer roles: 'matrix' = the banks or the 2-D block matrices (Muon); 'embed' = token,
        bigram and VE tables; 'head' = an untied head; 'scalar' = everything else (control tensors,
        gates, lambdas, and the small bigram/VE projections, which the 2026-03-23 record steps with
        scalar Adam; with `bigram_proj_muon` the bigram projection is a Muon matrix instead, as in
        PR #339)."""
        slots = bank_slots(self.num_layers)
        matrices = set(BANKS) if self.banked else {n for names in slots.values() for n in names}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            k: [] for k in ("matrix", "scalar", "embed", "head")
        }
        for name, p in self.named_parameters():
            if name in matrices or (self.cfg.bigram_proj_muon and name == "bigram.proj.weight"):
                groups["matrix"].append((name, p))
            elif name in EMBED_TABLES:
                groups["embed"].append((name, p))
            elif name.startswith("lm_head."):
                groups["head"].append((name, p))
            else:
                groups["scalar"].append((name, p))
        return groups

    def _layered_keys(self) -> list[str]:
        if self._export_keys is None:  # a weightless per-layer twin gives the canonical key order
            with torch.device("meta"):  # (whatever model.param_order says: it orders the grad clip)
                twin = GPT(dataclasses.replace(self.cfg, param_order=[]), banked=False, init=False)
                self._export_keys = list(twin.state_dict())
        return self._export_keys

    def export_state_dict(self) -> dict[str, Tensor]:
        """The state dict with per-layer 2-D matrices `blocks.{i}.attn.c_q.weight`, ...: what
        quantizers and checkpoints see, key-for-key the per-layer model's state dict."""
        state = self.state_dict()
        return unbank(state, self.num_layers, self._layered_keys()) if self.banked else state

    def load_export_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a per-layer state dict (re-stacking the banks); strict, in place."""
        self.load_state_dict(rebank(state, self.num_layers) if self.banked else state, strict=True)

    def block_passes(self) -> list[int]:
        """The physical layer of every block the forward runs, in order (looped layers repeat)."""
        if self.looping:
            return list(self.enc_loop) + list(self.dec_loop)
        return list(self.enc_plain) + list(self.dec_plain)

    @contextmanager
    def doc_masked(self, max_len: int | None = None) -> Iterator[None]:
        """Attention within documents (as model.doc_mask=true) for the forwards inside, whatever the
        config says, with documents cut every `max_len` tokens if given (else model.doc_max_len):
        phased TTT's global SGD trains on concatenated documents this way."""
        before = self._doc_mask, self._doc_cap
        from pgolf.models.docmask import DocMask

        self._doc_mask, self._doc_cap = DocMask, max_len
        try:
            yield
        finally:
            self._doc_mask, self._doc_cap = before

    @contextmanager
    def doc_unmasked(self) -> Iterator[None]:
        """Plain causal attention (as model.doc_mask=false) for the forwards inside, whatever the
        config says: PR #1775 calibrates GPTQ this way (quant.calibration.doc_mask=false)."""
        before = self._doc_mask, self._doc_cap
        self._doc_mask, self._doc_cap = None, None
        try:
            yield
        finally:
            self._doc_mask, self._doc_cap = before

    def graph_variants(self) -> list[str]:
        """The compiled graphs training can switch between; the trainer primes each before the clock."""
        if self.cfg.num_loops == 0:
            return [STATIC]
        return [LOOP_ON] if self.cfg.enable_looping_at <= 0.0 else [LOOP_OFF, LOOP_ON]

    def set_graph_variant(self, name: str) -> None:
        if name not in self.graph_variants():
            raise ValueError(f"unknown graph variant {name!r}; this model has {self.graph_variants()}")
        self.looping = name == LOOP_ON

    def on_progress(self, frac: float) -> str | None:
        """Host-side, once per step before it runs: loops switch on at `enable_looping_at`
        (docs/techniques.md#depth-recurrence).

        Returns a line for the log when the graph variant changes, else None.
        """
        if not self.cfg.num_loops:
            return None
        before, self.looping = self.looping, frac >= self.cfg.enable_looping_at
        if self.looping == before:
            return None
        layers = list(self.enc_loop + self.dec_loop) if self.looping else list(range(self.num_layers))
        return f"graph_variant:{LOOP_ON if self.looping else LOOP_OFF} frac:{frac:.3f} layers:{layers}"


def build(cfg: GPTModelConfig) -> GPT:
    return GPT(cfg, banked=type(cfg).BANKED)
