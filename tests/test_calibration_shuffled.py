"""quant.calibration.source=shuffled and calibration.doc_mask=false: PR #1775's GPTQ calibration.

The PR's serialize() builds a fresh ShuffledSequenceLoader and collect_hessians reads
GPTQ_CALIBRATION_BATCHES=64 of its batches (48 rows of 2048 on 8 GPUs) through forward_logits
without cu_seqlens; rank 0's Hessians make the artifact. The loader is written out plainly below
(lists and pops) for rank 0 of a world of W: shards 0::W, RNG PCG64(0).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_tokens

from pgolf.data.shuffled import record_batches
from pgolf.models.config import BankedGPTConfig
from pgolf.models.gpt import GPT
from pgolf.models.layers import restore_fp32_params
from pgolf.quant.config import CalibrationConfig, GroupQuant, MixedQuantConfig
from pgolf.quant.mixed import MixedQuant
from pgolf.trainer import Trainer

STRIDE = 4000  # token value = shard * STRIDE + position
SIZES = [3000, 2500, 4000, 1800, 3500, 50]
T = 64
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("calib_shards")
    out = []
    for s, n in enumerate(SIZES):
        path = folder / f"fineweb_train_{s:06d}.bin"
        write_tokens(path, s * STRIDE + np.arange(n))
        out.append(path)
    return out


class ScriptRankZeroLoader:
    """The script's ShuffledSequenceLoader as rank 0 of `world` ranks builds it."""

    def __init__(self, world: int, seq_len: int):
        self.world, self.seq_len = world, seq_len
        self.sizes = SIZES[0::world]
        self.shard_ids = list(range(len(SIZES)))[0::world]
        self.rng = np.random.Generator(np.random.PCG64(0))
        self.starts: list[list[int]] = [[] for _ in self.sizes]
        for si in range(len(self.sizes)):
            self.reset(si)

    def reset(self, si: int) -> None:
        n, L = self.sizes[si], self.seq_len
        max_phase = min(L - 1, max(0, n - L - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        count = (n - 1 - phase) // L
        self.starts[si] = (phase + self.rng.permutation(count) * L).tolist()

    def next_batch(self, global_tokens: int, grad_accum: int) -> list[list[int]]:
        rows = global_tokens // (self.world * grad_accum) // self.seq_len
        remaining = np.array([len(s) for s in self.starts], dtype=np.float64)
        out = []
        for _ in range(rows):
            total = remaining.sum()
            if total <= 0:
                for si in range(len(self.sizes)):
                    self.reset(si)
                remaining = np.array([len(s) for s in self.starts], dtype=np.float64)
                total = remaining.sum()
            si = int(self.rng.choice(len(self.sizes), p=remaining / total))
            start = self.starts[si].pop()
            remaining[si] -= 1
            base = self.shard_ids[si] * STRIDE + start
            out.append(list(range(base, base + self.seq_len + 1)))
        return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_record_batches_are_the_scripts_rank_zero_batches(files, world):
    grad_accum = 8 // world
    global_tokens = 5 * T * 8  # 5 rows per micro-batch
    local = global_tokens // (world * grad_accum)
    ref = ScriptRankZeroLoader(world, T)
    want = [ref.next_batch(global_tokens, grad_accum) for _ in range(50)]  # past a redraw of all shards
    got = [b.astype(np.int64).tolist() for b in record_batches(files, world, 50, local, T)]
    assert got == want
    # split over `world` processes: each reads every world-th batch of the same stream
    for share in range(world):
        part = [b.astype(np.int64).tolist() for b in record_batches(files, world, 50, local, T, share, world)]
        assert part == want[share::world]


def trainer_stub(files, source: str, world: int, rank: int) -> Trainer:
    t = object.__new__(Trainer)  # only what _calibration_stream reads
    t.job = SimpleNamespace(
        train=SimpleNamespace(batch_tokens=3 * T * 8, seq_len=3 * T),
        quant=SimpleNamespace(calibration=CalibrationConfig(source=source, batches=7, shuffled_seq_len=T)),
    )
    t.rt = SimpleNamespace(world_size=world, rank=rank, device=CPU)
    t.data = SimpleNamespace(train_files=files)
    t.grad_accum = 8 // world
    t.loader = SimpleNamespace(next_batch=lambda *a: ("training", "batch"))
    return t


def test_trainer_calibrates_on_its_share_of_rank_zeros_batches(files):
    ref = ScriptRankZeroLoader(2, T)
    want = [ref.next_batch(3 * T * 8, 4) for _ in range(7)]
    got = list(trainer_stub(files, "shuffled", 2, 1)._calibration_stream(4))
    assert len(got) == 3  # batches 1, 3, 5 of rank 0's 7
    for (x, y), rows in zip(got, want[1::2]):
        full = torch.tensor(rows)
        assert torch.equal(x, full[:, :-1]) and torch.equal(y, full[:, 1:])
    # the previous behaviour: the training loader's next micro-batches
    assert list(trainer_stub(files, "train", 2, 1)._calibration_stream(2)) == [("training", "batch")] * 2


def test_too_long_rows_fail_clearly(files):
    with pytest.raises(ValueError, match="shuffled_seq_len"):
        next(record_batches(files, 1, 1, T - 1, T))


def doc_model(doc_mask: bool) -> GPT:
    torch.manual_seed(0)
    cfg = BankedGPTConfig(
        vocab_size=64,
        num_layers=2,
        model_dim=32,
        num_heads=2,
        num_kv_heads=1,
        mlp_mult=2.0,
        doc_mask=doc_mask,
    )
    m = GPT(cfg, banked=True).eval()
    with torch.no_grad():  # zero-initialized output projections would hide the attention path
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_doc_unmasked_attends_across_documents():
    ids = torch.randint(2, 64, (2, 48))
    ids[:, 20] = 1  # a BOS mid-row
    masked, plain = doc_model(True), doc_model(False)
    with torch.no_grad():
        with masked.doc_unmasked():
            unmasked_nll = masked.token_nll(ids[:, :-1], ids[:, 1:])
        assert torch.equal(unmasked_nll, plain.token_nll(ids[:, :-1], ids[:, 1:]))
        assert not torch.equal(unmasked_nll, masked.token_nll(ids[:, :-1], ids[:, 1:]))  # and back on after


def record_cast_model() -> GPT:
    """A banked GPT cast as the trainer (and the records' scripts) cast it under bf16 amp:
    `.bfloat16()`, then linear weights and control tensors back to fp32."""
    m = doc_model(False)
    m = m.bfloat16()
    restore_fp32_params(m)
    return m.eval()


def mlp_inputs(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Block 0's MLP input in a plain forward (no autocast), read by a module hook: H's own x."""
    seen: list[torch.Tensor] = []
    hook = model.blocks[0].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x, y)
    finally:
        hook.remove()
    (h,) = seen
    return h.reshape(-1, h.shape[-1]).float()


def test_calibration_without_autocast_sees_the_records_bf16_forward():
    """quant.calibration.autocast=false (PR #1532 / #1775: collect_hessians outside autocast): the
    Hessians are those of the model's own forward, whose activations are bf16. (CPU autocast runs
    this model's ops in bf16 as well, so on CPU both settings give the same H; CUDA autocast runs
    ops such as norms and softmax in fp32, which is what the switch turns off.)"""
    m = record_cast_model()
    ids = torch.randint(2, 64, (2, 33), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    on = GroupQuant(gptq=True)
    q = MixedQuant(MixedQuantConfig(keep_float_max_numel=256, embed=on, attn=on, mlp=on, other=on))
    q.calibrate(m, [(x, y)], None)
    fc = next(n for n in q.hessians if n.startswith("blocks.0.") and n.endswith("mlp.fc.weight"))
    h = mlp_inputs(m, x, y)
    assert torch.equal(h, h.bfloat16().float())  # the records' bf16 activations
    torch.testing.assert_close(q.hessians[fc], h.T @ h, rtol=1e-6, atol=1e-6)


INFO = {"hessians": 0, "batches": 7, "unseen": [], "cut_by_deadline": False}


def test_trainer_passes_the_calibration_autocast_switch(files):
    """Trainer.calibrate hands quant.calibrate the run's amp dtype, or None with autocast=false."""
    seen = []
    for autocast in (True, False):
        t = trainer_stub(files, "train", 1, 0)
        t.job.quant.calibration.autocast = autocast
        t.rt.amp_dtype, t.rt.distributed, t.rt.sync = torch.bfloat16, False, lambda: None
        t.job.budget = SimpleNamespace(mode="steps", train_seconds=600.0)
        t.calibration_plan, t.model = {}, SimpleNamespace(doc_unmasked=nullcontext)
        t.quant = SimpleNamespace(calibrate=lambda model, batches, amp, *a, **k: seen.append(amp) or INFO)
        t.result, t.log, t.job.seed = SimpleNamespace(train_ms=0.0), lambda *_: None, 0
        t.calibrate()
    assert seen == [torch.bfloat16, None]
