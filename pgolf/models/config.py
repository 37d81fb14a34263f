"""Schemas of the `model` group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pgolf.registry import ConfigError

# The fused-kernel switches of the GPT family (pgolf.models.kernels).
FUSED_SWITCHES = (
    "fused_mlp",
    "fused_ce",
    "fused_mlp_train",
    "fused_mlp_gemm",
    "fused_mlp_up",
    "fused_qk_rope",
)


# The GPT family's own parameters (not those of its submodules), the names model.param_order orders.
GPT_OWN_PARAMS = (
    "skip_weights",
    "skip_gates",
    "qo_bank",
    "kv_bank",
    "mlp_up_bank",
    "mlp_down_bank",
    "parallel_resid_lambdas",
    "parallel_post_lambdas",
    "lane_merge",
    "backout_lambda",
)


def switch_on(value: bool | str) -> bool:
    """A fused-kernel switch as a bool. `auto` (model.fused_mlp_train, fused_mlp_up, fused_qk_rope)
    is on where the kernels run natively, CUDA with Triton installed, and off elsewhere (CPU runs,
    no Triton: the Triton interpreter is for parity tests, not runs); the kernels module is not
    imported to decide."""
    if value != "auto":
        return bool(value)
    import importlib.util

    import torch  # here, not at the top: config modules load before torch is needed

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def check_heads(path: str, model_dim: int, num_heads: int, num_kv_heads: int) -> None:
    """Heads must split the width evenly, and query heads must group evenly over KV heads (GQA)."""
    if model_dim % num_heads:
        raise ConfigError(f"{path}.model_dim={model_dim} must be divisible by {path}.num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"{path}.num_heads={num_heads} must be divisible by {path}.num_kv_heads={num_kv_heads}"
        )


@dataclass
class BaselineModelConfig:
    """The challenge's naive baseline GPT; every field is its env-var lower-cased.

    docs/techniques.md#baseline-gpt
    """

    name: str = "baseline"
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10_000.0
    qk_gain_init: float = 1.5

    def validate(self, path: str) -> None:
        check_heads(path, self.model_dim, self.num_heads, self.num_kv_heads)
        if (self.model_dim // self.num_heads) % 2:
            raise ConfigError(f"{path}: head_dim = model_dim/num_heads must be even for RoPE")
        if self.logit_softcap <= 0:
            raise ConfigError(f"{path}.logit_softcap={self.logit_softcap} must be positive")
        for key in ("num_layers", "model_dim", "mlp_mult", "vocab_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{path}.{key} must be >= 1")


# ---------------------------------------------------------------------------------------------
# The record GPT family (docs/techniques.md#model): one schema, two parameter layouts
# ---------------------------------------------------------------------------------------------

ATTN_GATES = ("attn_out_gate", "gated_attn", "sparse_attn_gate")


@dataclass
class GPTModelConfig:
    """Every architecture switch of the record stacks; keys are the records' env vars lower-cased.

    Switches are off by default; numeric values default to the naive baseline's. With every
    switch off the model is a plain pre-norm GQA transformer; `resid_mix`, `unet_skips` and
    `logit_softcap=30` turn it into the baseline. The layout (3-D banks or per-layer linears) is
    chosen by the registered name (`banked` / `layered`), not by a key: both names share these keys.
    """

    name: str = "layered"
    BANKED: ClassVar[bool] = False
    vocab_size: int = 1024
    # shape
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0  # hidden = int(mlp_mult * model_dim)
    activation: Literal["relu2", "leaky_relu2"] = "relu2"
    negative_slope: float = 0.5  # NEGATIVE_SLOPE of leaky_relu2
    # embeddings and head
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 0.0  # 0: off; the records use 30
    # z-loss (PaLM): the training loss gains z_loss * mean(logsumexp(logits)^2), pulling the softmax
    # normalizer toward 1 so the logits cannot drift upward together; evaluation never sees it. 0: off
    z_loss: float = 0.0
    # attention
    rope_base: float = 10_000.0
    rope_dims: int = 0  # ROPE_DIMS: rotate only the first rope_dims of each head (0: all)
    rope_train_seq_len: int = 0  # NTK base rescaling for longer sequences (0: off)
    # bfloat16: the record scripts' RoPE tables (their .bfloat16() casts inv_freq; positions past
    # 256 round), used up to rope_train_seq_len as they do; float32: exact positions;
    # bfloat16_inv_freq: the cast inv_freq with fp32 positions (PR #1775's Rotary, which takes
    # `inv_freq.float()` and an fp32 arange), wherever the NTK base is not in use
    rope_table_dtype: Literal["float32", "bfloat16", "bfloat16_inv_freq"] = "float32"
    qk_gain_init: float = 1.5
    # Document-masked attention (pgolf.models.docmask; docs/models.md): a token attends only to
    # earlier tokens of its own document, i.e. never across a BOS (`bos_id`) or a row start. The
    # kernel is hardware.doc_attention's. doc_max_len > 0 also cuts a document every doc_max_len
    # tokens from its start (the records' cap when a micro-batch is one long row); 0: no cap.
    doc_mask: bool = False
    doc_max_len: int = 0
    xsa_last_n: int = 0  # XSA on the last n physical layers (more than num_layers: all)
    xsa_layers: list[int] = field(default_factory=list)  # ... or on an explicit set
    attn_out_gate: bool = False  # AttnOutGate: 2*sigmoid(W x[:gate_window]) per head
    attn_out_gate_src: Literal["proj", "q"] = "proj"  # gate input: block input or raw Q projection
    gated_attn: bool = False  # dense gate: sigmoid(W_g x), W_g: heads x dim
    gated_attn_init_std: float = 0.01
    sparse_attn_gate: bool = False  # sparse gate: sigmoid(s * W_g x[:gate_window])
    sparse_attn_gate_init_std: float = 0.0
    sparse_attn_gate_scale: float = 1.0
    gate_window: int = 12  # GATE_WINDOW: input width of AttnOutGate, the sparse gate, SmearGate v3
    # (the gates: docs/techniques.md#attention-output-gates)
    # residual structure
    ln_scale: bool = False  # sub-block inputs of physical layer i scaled by 1/sqrt(i+1)
    resid_mix: bool = False  # learned per-channel mix of the stream with x0 before each block
    unet_skips: bool = False  # encoder outputs added back LIFO into the decoder
    skip_gates_enabled: bool = False  # sigmoid-gated (lerp) U-Net skips; needs unet_skips
    # gptj, two_lane (concurrent reads), two_lane_seq (MLP reads after attention), split_lane
    # (attention and MLP on separate lanes): docs/techniques.md#parallel-residuals
    parallel_residual: Literal["none", "gptj", "two_lane", "two_lane_seq", "split_lane"] = "none"
    parallel_start_layer: int = 7  # first physical layer of the parallel form
    # two-lane forms: the hidden that leaves; learned = lane_merge m*lane0 + (1-m)*lane1 (split_lane's merge)
    parallel_final_lane: Literal["mean", "attn", "mlp", "learned"] = "mean"
    backout: bool = False  # subtract lambda * h_mid before the final norm (PR #339)
    # h_mid = the stream after this many executed layers (-1: the U-Net midpoint, num_layers // 2).
    # PR #339's code takes it after *block index* num_layers // 2, one layer later: 6 at 11 layers.
    backout_layer: int = -1
    backout_lambda_init: float = 0.2
    # embedding add-ons
    smear_gate: Literal["none", "v2", "v3"] = "none"
    smear_bos_fix: bool = False  # no previous-token term at BOS positions (docs/techniques.md#smeargate)
    bos_id: int = 1
    bigram_vocab_size: int = 0  # BigramHash buckets (0: off)
    bigram_dim: int = 128
    # the bigram projection's optimizer: false = scalar Adam (PR #399, #549); true = Muon with the
    # block matrices (PR #339); needs the per-layer layout (parallel_muon shards only the banks)
    bigram_proj_muon: bool = False
    # with ortho_init, also scale the bigram projection by 1/sqrt(2 num_layers) like the output
    # projections (PR #339's init treats every `*.proj` linear as one)
    bigram_proj_scaled_init: bool = False
    ve_enabled: bool = False  # value embeddings
    ve_dim: int = 128
    ve_layers: list[int] = field(default_factory=lambda: [9, 10])
    # initialization
    ortho_init: bool = False  # orthogonal init of matrices with both dims >= 64
    zero_init_proj: bool = True  # attention/MLP output projections start at zero
    # The order in which the init draws from the torch RNG; the distributions are the same, so this
    # only decides which seed gives which weights. fixed: the block matrices are created empty and
    # drawn in one layout-independent order (per layer q, o, k, v, up, down), then the other linears,
    # so banked and layered models of one seed are equal. construction: PR #339's script's order,
    # which a reproduction needs to start from its very weights: every per-layer linear first draws
    # nn.Linear's default (kaiming-uniform) init when it is constructed, then one pass over
    # named_modules() overwrites them (the bigram projection comes first there); linears this pass
    # leaves alone (a dim < 64) keep their default init. Per-layer layout only.
    init_rng_order: Literal["fixed", "construction"] = "fixed"
    # The model's own parameters registered first, in this order (a record GPT's registration
    # order; the rest follow in pgolf's): parameters() order is the grad clip's reduction order
    # (OptimizerBundle.all_params), so the clip coefficient is the record's bit for bit. Empty:
    # pgolf's order (skip_weights, skip_gates, the banks, the lane lambdas), PR #399's and #726's.
    # Exports keep the canonical per-layer key order either way.
    param_order: list[str] = field(default_factory=list)
    # depth recurrence
    num_loops: int = 0  # extra passes over layers loop_start..loop_end (0: off)
    loop_start: int = 0
    loop_end: int = 0
    enable_looping_at: float = 0.0  # training fraction at which the loops switch on (0: from the start)
    # fused Triton kernels (pgolf.models.kernels; need Triton + CUDA, or TRITON_INTERPRET=1)
    fused_mlp: bool = False  # the leaky_relu^2 / relu^2 activation, forward + backward
    fused_ce: bool = False  # soft-capped cross entropy, forward + backward (needs logit_softcap > 0)
    # with grad on (training, TTT training): the activation in the up-projection GEMM's epilogue
    # (pre-activation and activation from one GEMM) and its derivative in the epilogue of the GEMM
    # that makes the activation's gradient, as PR #1775's training MLP; replaces fused_mlp there.
    # `auto` as below (on in the sp8192 record experiments, where it was measured:
    # docs/benchmarks.md §9i)
    fused_mlp_train: bool | Literal["auto"] = False
    # inference only: act(h) @ W_down^T in one GEMM, the activation applied as h's tiles load (grad
    # off: scoring; training and TTT training keep the differentiable path)
    fused_mlp_gemm: bool = False
    # inference only: leaky_relu(x W_up^T)^2 as the up-projection GEMM's epilogue, the down
    # projection left to cuBLAS (grad off); the other place to fuse the activation than
    # fused_mlp_gemm, so at most one of the two
    fused_mlp_up: bool | Literal["auto"] = False
    # inference only: q/k rms_norm + partial RoPE (+ q_gain) as one kernel per tensor (grad off)
    fused_qk_rope: bool | Literal["auto"] = False
    # (auto, for these and fused_mlp_train: on where CUDA and Triton are, off elsewhere, e.g. CPU
    # runs of a record experiment; the run log and result.json `fused_kernels` say which was used)

    def validate(self, path: str) -> None:
        for key in ("num_layers", "model_dim", "num_heads", "num_kv_heads", "vocab_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{path}.{key} must be >= 1")
        check_heads(path, self.model_dim, self.num_heads, self.num_kv_heads)
        head_dim = self.model_dim // self.num_heads
        rope_dims = self.rope_dims or head_dim
        if self.rope_dims < 0 or rope_dims % 2 or rope_dims > head_dim:
            raise ConfigError(
                f"{path}.rope_dims={self.rope_dims} must be even and <= head_dim={head_dim} (0: all of it)"
            )
        if self.rope_train_seq_len < 0 or (self.rope_train_seq_len > 0 and rope_dims <= 2):
            raise ConfigError(
                f"{path}.rope_train_seq_len={self.rope_train_seq_len}: must be >= 0, and NTK rescaling "
                "needs more than 2 rotated dims"
            )
        if self.doc_max_len < 0 or (self.doc_max_len and not self.doc_mask):
            raise ConfigError(
                f"{path}.doc_max_len={self.doc_max_len} must be >= 0 and caps documents only under "
                f"the document mask: set {path}.doc_mask=true or {path}.doc_max_len=0"
            )
        if int(self.mlp_mult * self.model_dim) < 1:
            raise ConfigError(f"{path}.mlp_mult={self.mlp_mult} gives an empty MLP")
        if self.logit_softcap < 0:
            raise ConfigError(f"{path}.logit_softcap={self.logit_softcap} must be >= 0 (0: off)")
        if self.fused_ce and self.logit_softcap <= 0:
            raise ConfigError(f"{path}.fused_ce fuses the soft-capped loss; set {path}.logit_softcap > 0")
        if self.z_loss < 0:
            raise ConfigError(f"{path}.z_loss={self.z_loss} must be >= 0 (0: off)")
        if self.z_loss and self.fused_ce:
            raise ConfigError(
                f"{path}.z_loss needs the logits, which {path}.fused_ce never stores; set one of them off"
            )
        if self.fused_mlp_train and self.fused_mlp:
            raise ConfigError(
                f"{path}.fused_mlp_train and {path}.fused_mlp both fuse the training MLP's activation; "
                "set one of them false"
            )
        if self.fused_mlp_gemm and self.fused_mlp_up:
            raise ConfigError(
                f"{path}.fused_mlp_gemm and {path}.fused_mlp_up both fuse the MLP activation into a GEMM "
                "(the down and the up projection); set one of them to false"
            )
        L = self.num_layers
        gates = [g for g in ATTN_GATES if getattr(self, g)]
        if len(gates) > 1:
            raise ConfigError(
                f"{path}: {' and '.join(f'{path}.{g}' for g in gates)} are mutually exclusive; the records "
                f"use at most one attention output gate ({', '.join(ATTN_GATES)})"
            )
        needs_window = self.attn_out_gate or self.sparse_attn_gate or self.smear_gate == "v3"
        if needs_window and not 1 <= self.gate_window <= self.model_dim:
            raise ConfigError(f"{path}.gate_window={self.gate_window} must be in [1, model_dim]")
        if self.xsa_last_n < 0:
            raise ConfigError(f"{path}.xsa_last_n must be >= 0")
        if self.xsa_layers and self.xsa_last_n:
            raise ConfigError(f"{path}: set either {path}.xsa_last_n or {path}.xsa_layers, not both")
        for key in ("xsa_layers",) + (("ve_layers",) if self.ve_enabled else ()):
            bad = [i for i in getattr(self, key) if not 0 <= i < L]
            if bad or len(set(getattr(self, key))) != len(getattr(self, key)):
                raise ConfigError(f"{path}.{key}={getattr(self, key)}: layers must be distinct, in [0, {L})")
        if self.ve_enabled and (self.ve_dim < 1 or not self.ve_layers):
            raise ConfigError(f"{path}: value embeddings need ve_dim >= 1 and at least one ve_layers entry")
        if self.skip_gates_enabled and not self.unet_skips:
            raise ConfigError(f"{path}.skip_gates_enabled gates the U-Net skips; set {path}.unet_skips=true")
        if self.parallel_residual != "none" and not 0 <= self.parallel_start_layer < L:
            raise ConfigError(f"{path}.parallel_start_layer={self.parallel_start_layer} must be in [0, {L})")
        if self.parallel_final_lane == "learned" and self.parallel_residual in ("none", "gptj"):
            raise ConfigError(
                f"{path}.parallel_final_lane=learned merges two lanes; set {path}.parallel_residual to "
                "two_lane, two_lane_seq or split_lane"
            )
        if self.bigram_vocab_size != 0 and (self.bigram_vocab_size < 2 or self.bigram_dim < 1):
            raise ConfigError(f"{path}.bigram_vocab_size must be 0 (off) or >= 2, with bigram_dim >= 1")
        if self.bigram_proj_muon and type(self).BANKED:
            raise ConfigError(
                f"{path}.bigram_proj_muon routes the bigram projection to Muon, but optimizer=parallel_muon "
                "shards only the 3-D banks of model=banked; use model=layered (with optimizer=muon) or "
                f"set {path}.bigram_proj_muon=false"
            )
        if self.init_rng_order == "construction" and type(self).BANKED:
            raise ConfigError(
                f"{path}.init_rng_order=construction replays the init of per-layer nn.Linear modules, "
                f"which model=banked does not have; use model=layered or {path}.init_rng_order=fixed"
            )
        unknown = sorted(set(self.param_order) - set(GPT_OWN_PARAMS))
        if unknown or len(set(self.param_order)) != len(self.param_order):
            raise ConfigError(
                f"{path}.param_order={self.param_order}: each name once, from {', '.join(GPT_OWN_PARAMS)}"
            )
        if self.smear_bos_fix and self.smear_gate == "none":
            raise ConfigError(
                f"{path}.smear_bos_fix applies to the SmearGate; set {path}.smear_gate=v2 or v3"
            )
        if self.backout and (L < 2 or (self.backout_layer != -1 and not 1 <= self.backout_layer < L)):
            raise ConfigError(
                f"{path}.backout_layer={self.backout_layer} must be -1 (U-Net midpoint) or in [1, {L}), "
                "and backout needs num_layers >= 2"
            )
        if self.num_loops < 0:
            raise ConfigError(f"{path}.num_loops must be >= 0 (0: no depth recurrence)")
        if self.num_loops and not 0 <= self.loop_start <= self.loop_end < L:
            raise ConfigError(
                f"{path}: depth recurrence needs 0 <= loop_start <= loop_end < num_layers={L}, got "
                f"loop_start={self.loop_start} loop_end={self.loop_end}"
            )
        if not 0.0 <= self.enable_looping_at <= 1.0:
            raise ConfigError(f"{path}.enable_looping_at={self.enable_looping_at} must be in [0, 1]")


@dataclass
class LayeredGPTConfig(GPTModelConfig):
    """Per-layer linears `blocks.{i}.attn.c_q` ...: the state-dict layout quantizers expect."""

    name: str = "layered"
    BANKED: ClassVar[bool] = False


@dataclass
class BankedGPTConfig(GPTModelConfig):
    """Parameter banks `qo_bank`, `kv_bank`, `mlp_up_bank`, `mlp_down_bank`.

    docs/techniques.md#parameter-banks
    """

    name: str = "banked"
    BANKED: ClassVar[bool] = True
