"""Small building blocks shared by the model families."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Parameters matching these names are "control" tensors: kept in fp32, stepped by the scalar Adam
# group, and exported as float (the records' CONTROL_TENSOR_NAME_PATTERNS).
CONTROL_PATTERNS = (
    "attn_scale",
    "attn_scales",
    "mlp_scale",
    "mlp_scales",
    "resid_mix",
    "resid_mixes",
    "q_gain",
    "skip_weight",
    "skip_weights",
    # The record GPT family's gates and lambdas (no baseline parameter name contains these).
    "skip_gates",
    "smear",
    "attn_gate",
    "parallel_post_lambdas",
    "parallel_resid_lambdas",
    "lane_merge",
    "backout_lambda",
    "ve_layer_scales",
    "ve_shared.scale",
)


def is_control(name: str) -> bool:
    return any(p in name for p in CONTROL_PATTERNS)


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def mean_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy with the softmax in fp32 (logits (B, T, V), targets (B, T))."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="mean")


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token NLL in fp32, shape (B, T): what evaluation sums for val_loss and val_bpb."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return nll.view_as(targets)


class CastedLinear(nn.Linear):
    """Weights stay fp32 for the optimizer; the matmul runs in the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def last_rows(x: Tensor, rows: int) -> Tensor:
    """The last `rows` positions of (B, T, ...) x; all of them when rows is 0."""
    return x[:, x.size(1) - rows :] if rows else x


def rotary_tables(
    seq_len: int,
    head_dim: int,
    base: float,
    device: torch.device,
    dtype: torch.dtype,
    table_dtype: torch.dtype = torch.float32,
    inv_freq_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Half-split RoPE cos/sin of shape (1, T, 1, D/2), computed in `table_dtype` then cast.

    `table_dtype=torch.bfloat16` reproduces the record scripts' tables: their `model.bfloat16()`
    also casts the rotary `inv_freq` buffer, and positions are then `arange(T, dtype=bf16)`, which
    rounds positions past 256 (to multiples of 8 past 1024). Models read them through
    `RotaryTables`, which caches them. `inv_freq_dtype` rounds the frequencies alone (to bf16, say)
    before the positions multiply them in `table_dtype`: PR #1775's tables.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if inv_freq_dtype is not None:
        inv_freq = inv_freq.to(inv_freq_dtype)
    inv_freq = inv_freq.to(table_dtype)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=table_dtype), inv_freq)
    return freqs.cos()[None, :, None, :].to(dtype), freqs.sin()[None, :, None, :].to(dtype)


# Positions the cached RoPE tables cover: past the longest training row of the records (#1775 packs
# 98,304 tokens per rank into one row). A longer sequence computes its tables in the graph.
ROPE_CACHE_POSITIONS = 1 << 17


@functools.lru_cache(maxsize=8)
def _cpu_tables(
    positions: int, head_dim: int, base: float, table_dtype: torch.dtype, inv_freq_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """One CPU copy per variant for every model of the process (about 25 ms to build): nothing
    writes these buffers in place, and moving a model to another device copies them. float32 holds
    a bfloat16 table exactly, so the cast at use gives what rotary_tables gives."""
    return rotary_tables(
        positions, head_dim, base, torch.device("cpu"), torch.float32, table_dtype, inv_freq_dtype
    )


class RotaryTables(nn.Module):
    """`rotary_tables` computed once, for positions 0..ROPE_CACHE_POSITIONS-1 of the model's own
    base and table dtypes, and held as non-persistent buffers: they move with the model, stay
    float32 through its casts (`_apply`) and never reach a checkpoint or the artifact.

    Why a cache: built inside the compiled graph from `arange`, the tables depend on no input, so
    Inductor inlines them (pow, cos, sin per element) into every kernel that reads them and the
    partitioner recomputes them in the backward rather than saving them. On #1775's stack those
    kernels took 31 ms of a 1,274 ms step (docs/benchmarks.md §9j). As graph inputs they are only
    read. A call asking for other tables (an NTK base, fp32 positions past the RoPE train length,
    more positions) computes them in the graph, as before. A row of the cache is the same
    element-wise arithmetic as the table of a shorter sequence, so slicing it gives the same values.
    """

    def __init__(
        self,
        head_dim: int,
        base: float,
        table_dtype: torch.dtype = torch.float32,
        inv_freq_dtype: torch.dtype | None = None,
        positions: int | None = None,  # default ROPE_CACHE_POSITIONS
    ):
        super().__init__()
        positions = ROPE_CACHE_POSITIONS if positions is None else positions
        self._table_args = (positions, head_dim, base, table_dtype, inv_freq_dtype)
        cos, sin = _cpu_tables(*self._table_args)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """Moves apply, casts do not: after `model.bfloat16()` the tables stay float32 (each call
        casts them to its activations' dtype), so a model cast to bf16 and back to fp32, or one
        that runs fp32 activations, still reads the exact tables."""
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            cos, sin = _cpu_tables(*self._table_args)
            self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self

    def forward(
        self,
        seq_len: int,
        head_dim: int,
        base: float,
        dtype: torch.dtype,
        table_dtype: torch.dtype = torch.float32,
        inv_freq_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        own = (head_dim, base, table_dtype, inv_freq_dtype) == self._table_args[1:]
        if own and seq_len <= self.cos.size(1):
            return self.cos[:, :seq_len].to(dtype), self.sin[:, :seq_len].to(dtype)
        return rotary_tables(seq_len, head_dim, base, self.cos.device, dtype, table_dtype, inv_freq_dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def ntk_rope_base(base: float, rope_dims: int, seq_len: int, train_seq_len: int) -> float:
    """NTK-aware base for sequences longer than the RoPE train length.

    docs/techniques.md#partial-rope-and-ntk-base

    base' = base * (T / T_train)^(rd / (rd - 2)); unchanged when T <= T_train or T_train is 0.
    """
    if train_seq_len <= 0 or seq_len <= train_seq_len:
        return base
    return base * (seq_len / train_seq_len) ** (rope_dims / (rope_dims - 2))


def apply_partial_rotary(x: Tensor, cos: Tensor, sin: Tensor, rope_dims: int) -> Tensor:
    """Half-split RoPE on the first `rope_dims` dims of each head; the rest carry no position."""
    if rope_dims == x.size(-1):
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :rope_dims], cos, sin), x[..., rope_dims:]), dim=-1)


def restore_fp32_params(model: nn.Module) -> None:
    """After `.bfloat16()`: linear weights, vectors and control tensors go back to fp32.

    3-D parameters are banks of linear weights (docs/techniques.md#parameter-banks) and are kept in fp32
    like them.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CastedLinear):
                module.float()
        for name, p in model.named_parameters():
            if (p.ndim < 2 or p.ndim == 3 or is_control(name)) and p.dtype != torch.float32:
                p.data = p.data.float()
