"""Training FLOPs per token of a model config: the one formula behind the MFU in every run's log.

docs/architecture.md#throughput-and-mfu states it and works it out for experiment=r0409 and pr726.
Per token, one forward multiplies through every matmul weight once per pass (2 FLOPs per weight)
and runs attention over its context; the backward costs twice the forward (input and weight
gradients), so training is 3x the forward:

    train = 3 * (2 * matmul_params + attention)     attention = 4 * d * T * causal * layers

matmul_params counts the weights of every executed layer pass (a looped layer once per pass), the
LM head (tied or not: it is a V x d GEMM) and the small projections (gates, BigramHash, value
embeddings); embedding lookups, norms and elementwise work are not counted. Attention: QK^T and
AV, 2 * d * context FLOPs each per token and layer pass, with context = T * causal where causal =
1/2 (a causal kernel skips the masked half; PaLM's convention, causal = 1, gives 12 * L * T * d for
fwd + bwd). Under model.doc_mask with model.doc_max_len > 0, T is the document cap (a bound).
"""

from __future__ import annotations

from pgolf.models.recurrence import virtual_layers

CAUSAL = 0.5  # fraction of the T x T score matrix a causal kernel computes
FWD_BWD = 3.0  # forward + backward (input and weight gradients: 2x the forward)


def layer_passes(cfg, looping: bool = True) -> int:
    """Executed transformer layers per forward: looped layers count once per pass."""
    loops = getattr(cfg, "num_loops", 0) if looping else 0
    return len(
        virtual_layers(cfg.num_layers, loops, getattr(cfg, "loop_start", 0), getattr(cfg, "loop_end", 0))
    )


def matmul_params(cfg, looping: bool = True) -> int:
    """Matmul weights one token passes through in a forward (layer weights once per pass)."""
    d, heads = cfg.model_dim, cfg.num_heads
    kv = cfg.num_kv_heads * (d // heads)
    hidden = int(cfg.mlp_mult * d)
    layer = 2 * d * d + 2 * d * kv + 2 * d * hidden  # q, o; k, v; MLP up, down
    if getattr(cfg, "gated_attn", False):
        layer += heads * d
    elif getattr(cfg, "attn_out_gate", False) or getattr(cfg, "sparse_attn_gate", False):
        layer += heads * cfg.gate_window
    once = cfg.vocab_size * d  # LM head
    if getattr(cfg, "bigram_vocab_size", 0) and cfg.bigram_dim != d:
        once += cfg.bigram_dim * d
    if getattr(cfg, "ve_enabled", False) and cfg.ve_dim != kv:
        once += cfg.ve_dim * kv
    if getattr(cfg, "smear_gate", "none") == "v3":
        once += cfg.gate_window
    return layer_passes(cfg, looping) * layer + once


def attention_context(cfg, seq_len: int) -> int:
    """Keys a query can attend to at most: the sequence, or the document cap under doc_mask."""
    cap = getattr(cfg, "doc_max_len", 0) if getattr(cfg, "doc_mask", False) else 0
    return min(seq_len, cap) if cap > 0 else seq_len


def forward_flops_per_token(cfg, seq_len: int, looping: bool = True, causal: float = CAUSAL) -> float:
    attention = 4.0 * cfg.model_dim * attention_context(cfg, seq_len) * causal * layer_passes(cfg, looping)
    return 2.0 * matmul_params(cfg, looping) + attention


def train_flops_per_token(cfg, seq_len: int, looping: bool = True, causal: float = CAUSAL) -> float:
    """FLOPs of one training token (forward + backward) of model config `cfg` at `seq_len`."""
    return FWD_BWD * forward_flops_per_token(cfg, seq_len, looping, causal)
