"""Schemas of the `quant` group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pgolf.registry import ConfigError

# Parameter names (substrings) routed to the `embed` group: token/bigram/VE tables, an untied head.
EMBED_NAMES = ("tok_emb", "bigram.embed", "ve_shared.embed", "lm_head")


def route(name: str) -> str:
    """The routing group of a large matrix, by name (the records' classify rule): embed | mlp | attn | other."""
    if any(p in name for p in EMBED_NAMES):
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attn"
    return "other"


@dataclass
class Int8ZlibConfig:
    """Baseline export: per-row int8 with percentile clipping, small tensors as float, zlib-9."""

    name: str = "int8_zlib"
    clip_percentile: float = 99.99984
    keep_float_max_numel: int = 65_536
    zlib_level: int = 9

    def matrix_bits(self, name: str) -> int | None:
        """Bits of the per-row integer codes the exporter gives a large matrix `name` (late QAT trains
        towards the same grid): int8 for every one."""
        return 8

    def validate(self, path: str) -> None:
        if not 0.0 < self.clip_percentile <= 100.0:
            raise ConfigError(f"{path}.clip_percentile must be in (0, 100]")
        if not 0 <= self.zlib_level <= 9:
            raise ConfigError(f"{path}.zlib_level must be in 0..9")


@dataclass
class GroupQuant:
    """How one routing group of large matrices is quantized (docs/techniques.md#mixed-int-n-routing)."""

    bits: int = 6  # 2..8; codes are stored one per byte, the compressor removes the unused bits
    # rowmax: step = max|row| / qmax (PR #339 / #399's int6); search: GPTQ-lite's best percentile
    clip: Literal["sdclip", "percentile", "rowmax", "search"] = "sdclip"
    sigmas: float = 12.85  # sdclip: per-row step = sigmas * std(row) / (2**(bits-1) - 1)
    percentile: float = 99.99984  # percentile: per-row clip at this quantile of |row|
    gptq: bool = False  # full-Hessian GPTQ (needs calibration); else round to nearest
    # percentile/search: the pre-SDClip records' step floor of 1/qmax (docs/techniques.md#mixed-int-n-routing)
    floor: bool = False
    search_per_row: bool = True  # search: best clip per row; false = one per matrix (2026-03-23 code)
    # percentile without GPTQ: clamp values to the clip and round with the exact fp32 step, storing
    # it as fp16 afterwards (the 2026-03 records' int8 path); false: codes from the stored fp16 step
    clip_then_round: bool = False

    def validate(self, path: str) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"{path}.bits={self.bits} must be in 2..8")
        if self.sigmas <= 0:
            raise ConfigError(f"{path}.sigmas must be positive")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"{path}.percentile must be in (0, 100]")
        if self.clip_then_round and (self.clip != "percentile" or self.gptq):
            raise ConfigError(
                f"{path}.clip_then_round is the records' percentile rounding without GPTQ; set "
                f"{path}.clip=percentile and {path}.gptq=false, or clip_then_round=false"
            )


@dataclass
class CalibrationConfig:
    """Where GPTQ's Hessians come from: training batches drawn after training stops, inside the
    budget.quant_reserve_seconds that the trainer takes off the training clock."""

    # train: the training loader's next micro-batches; self: sequences the model samples itself;
    # shuffled: PR #1775's, the batches rank 0 of the record run draws from a fresh
    # ShuffledSequenceLoader (shards 0::world, RNG from rank 0 alone), rows of shuffled_seq_len
    source: Literal["train", "self", "shuffled"] = "train"
    # train / shuffled: micro-batches (of the training micro-batch's tokens), split over the ranks
    batches: int = 64
    # source=shuffled: the rows' length; 0 takes train.seq_len (the records' TRAIN_SEQ_LEN, which
    # their calibration loader reads)
    shuffled_seq_len: int = 0
    # false: the calibration forwards attend across documents even where model.doc_mask is on
    # (PR #1775's collect_hessians runs forward_logits without cu_seqlens)
    doc_mask: bool = True
    # false: the calibration forwards run without autocast, in the model's own dtypes (bf16
    # embeddings and activations, fp32 weights cast to bf16 at use): PR #1532's and #1775's
    # serialize() call collect_hessians outside the training loop's autocast, so ops autocast would
    # run in fp32 (norms, softmax) run in bf16 there, and the Hessians see bf16-rounded inputs
    autocast: bool = True
    self_seqs: int = 64  # source=self: sequences sampled (2026-03-25 record: 64 x 2048 at temperature 0.8)
    self_seq_len: int = 2048
    self_batch: int = 8  # sequences sampled at a time
    temperature: float = 0.8
    damp: float = 0.01  # added to diag(H): damp * mean(diag(H))
    block_size: int = 128
    act_order: bool = True  # process columns by descending diag(H)

    def validate(self, path: str) -> None:
        if self.batches < 1 or self.block_size < 1 or self.damp < 0 or self.shuffled_seq_len < 0:
            raise ConfigError(
                f"{path}: batches >= 1, shuffled_seq_len >= 0, block_size >= 1 and damp >= 0 are required"
            )
        if self.self_seqs < 1 or self.self_seq_len < 2 or self.self_batch < 1 or self.temperature <= 0:
            raise ConfigError(f"{path}: self_seqs >= 1, self_seq_len >= 2, self_batch >= 1, temperature > 0")


@dataclass
class MixedQuantConfig:
    """Per-row int-N with name-based routing (embed | attn | mlp | other), GPTQ or round-to-nearest,
    small tensors kept as float, one compressor over the packed payload."""

    name: str = "mixed"
    embed: GroupQuant = field(default_factory=lambda: GroupQuant(bits=8, sigmas=20.0))
    attn: GroupQuant = field(default_factory=GroupQuant)
    mlp: GroupQuant = field(default_factory=GroupQuant)
    other: GroupQuant = field(default_factory=lambda: GroupQuant(bits=8, clip="percentile"))
    keep_float_max_numel: int = 65_536  # float tensors up to this size ship as float
    compressor: Literal["zlib", "zstd", "lzma", "brotli"] = "brotli"
    level: int = 11  # zlib 0-9, zstd 1-22, lzma preset 0-9, brotli quality 0-11
    lzma_extreme: bool = False  # lzma: preset level | PRESET_EXTREME (PR #399 / #726: 9 | extreme)
    control_fp32: bool = (
        True  # small control tensors as fp32 (baseline); false: fp16 like all small tensors (records)
    )
    byte_shuffle: bool = True  # group the bytes of fp16/fp32 sections by position before compressing
    # Order of the tensors in the blob: "role" (every layer's c_q, then every layer's c_k, ...; best
    # for lzma) or "layer" (layer by layer; zstd-22 prefers it: 725 KB less on #339's blob).
    # docs/quant.md#the-artifact-layout
    storage_order: Literal["role", "layer"] = "role"
    report_compressors: bool = False  # also record the bytes every installed compressor would give
    # attention gates (*.attn_gate_w, 32..8192 elements): int8 per row
    # (docs/techniques.md#attention-gate-int8)
    gate_int8: bool = False
    # LQER (docs/techniques.md#lqer)
    lqer_rank: int = 0  # rank-r correction of the top-k error matrices (0: off)
    lqer_top_k: int = 3
    lqer_factor_bits: int = 4  # the factors' per-row int bits
    # Selective +-1 pruning (docs/techniques.md#selective-pruning-to-fit): when model + code bytes exceed
    # budget.artifact_bytes (decimal), zero the fewest |q| = 1 matrix codes, smallest squared row
    # scale first, that make it fit.
    prune_to_fit: bool = False
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def groups(self) -> dict[str, GroupQuant]:
        return {"embed": self.embed, "attn": self.attn, "mlp": self.mlp, "other": self.other}

    def matrix_bits(self, name: str) -> int | None:
        """Bits of the per-row integer codes the exporter gives a large matrix `name`: its routing
        group's (late QAT trains towards the same grid)."""
        return self.groups()[route(name)].bits

    @property
    def needs_calibration(self) -> bool:
        return any(g.gptq for g in self.groups().values())

    def validate(self, path: str) -> None:
        for k, g in self.groups().items():
            g.validate(f"{path}.{k}")
        self.calibration.validate(f"{path}.calibration")
        if self.lqer_rank < 0 or self.lqer_top_k < 0 or not 2 <= self.lqer_factor_bits <= 8:
            raise ConfigError(f"{path}: lqer_rank >= 0, lqer_top_k >= 0 and lqer_factor_bits in 2..8")
        if self.lzma_extreme and self.compressor != "lzma":
            raise ConfigError(f"{path}.lzma_extreme applies to quant.compressor=lzma, not {self.compressor}")
        levels = {"zlib": (0, 9), "zstd": (1, 22), "lzma": (0, 9), "brotli": (0, 11)}[self.compressor]
        if not levels[0] <= self.level <= levels[1]:
            raise ConfigError(
                f"{path}.level={self.level} is out of range for {self.compressor} ({levels[0]}..{levels[1]})"
            )


@dataclass
class LosslessConfig:
    """No quantization: every tensor stored in its own dtype (torch.save + zlib). Far over the 16 MB
    cap for record-size models; for scoring exactly the trained (or imported) weights, e.g. when
    comparing eval code on the weights another script produced (bench/eval.sh)."""

    name: str = "lossless"
    zlib_level: int = 1

    def matrix_bits(self, name: str) -> int | None:
        """None: every tensor is stored exactly, so there is no integer grid (nor late QAT towards one)."""
        return None

    def validate(self, path: str) -> None:
        if not 0 <= self.zlib_level <= 9:
            raise ConfigError(f"{path}.zlib_level must be in 0..9")
