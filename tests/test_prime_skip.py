"""train.prime_skip_batches: the priming steps start that many micro-batches into the train stream
(PR #1775's script spends one on its cu_seqlens compile warm-up first), which reaches training only
through the Muon momentum that optimizer.keep_primed_momentum keeps; training's stream is unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_cpu_args

import pgolf.trainer as trainer_module
from pgolf.config import job_config_from_dict

pytestmark = pytest.mark.slow

PRIME_STEPS = 2  # tiny_cpu_args' priming steps, 8 micro-batches each on one process


@contextmanager
def built_trainer(tmp_path, shard_dir, tokenizer_model, compose, skip: int) -> Iterator:
    """A built (not yet primed) CPU trainer keeping its primed Muon momentum."""
    overrides = tiny_cpu_args(
        shard_dir,
        tokenizer_model,
        **{
            "optimizer.keep_primed_momentum": "true",
            "train.prime_skip_batches": str(skip),
            "wandb.mode": "disabled",
            "hardware.threads": "1",
        },
    )
    job_dir = tmp_path / f"skip{skip}"
    job_dir.mkdir(parents=True, exist_ok=True)
    job = job_config_from_dict({**compose(overrides), "job_dir": str(job_dir)})
    threads = torch.get_num_threads()
    trainer = trainer_module.Trainer(job, job_dir)
    try:
        trainer.build()
        yield trainer
    finally:
        trainer.close()
        torch.set_num_threads(threads)  # the runtime set this process's threads; give them back


def draw(trainer, loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = trainer.job.train
    return [loader.next_batch(t.batch_tokens, t.seq_len, trainer.grad_accum) for _ in range(n)]


def muon_momentum(trainer) -> list[torch.Tensor]:
    state = trainer.opt.muon.state_dict()  # momentum buffers by shape group
    return [state[k] for k in sorted(state)]


@pytest.mark.parametrize("skip", [0, 1, 3])
def test_priming_steps_see_the_stream_from_batch_skip_and_training_from_batch_0(
    tmp_path, shard_dir, tokenizer_model, compose, monkeypatch, skip
):
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_step = trainer_module.Trainer._train_step

    def spied_step(self, *args, **kwargs):  # records the batches a priming step draws
        real_next = self.loader.next_batch

        def next_batch(*a, **k):
            x, y = real_next(*a, **k)
            seen.append((x.clone(), y.clone()))
            return x, y

        self.loader.next_batch = next_batch  # on the instance: the class's method stays as it is
        try:
            return real_step(self, *args, **kwargs)
        finally:
            del self.loader.next_batch

    with built_trainer(tmp_path, shard_dir, tokenizer_model, compose, skip) as trainer:
        reference = trainer._build_loader()  # the same seeded stream, drawn independently
        n_variants = len(trainer.model.graph_variants())
        used = PRIME_STEPS * n_variants * trainer.grad_accum
        stream = draw(trainer, reference, skip + used)
        reference.close()
        monkeypatch.setattr(trainer_module.Trainer, "_train_step", spied_step)
        trainer.prime()
        monkeypatch.undo()
        assert len(seen) == used
        for i, ((x, y), (sx, sy)) in enumerate(zip(seen, stream[skip:])):
            assert torch.equal(x, sx) and torch.equal(y, sy), (
                f"priming micro-batch {i} is not stream[{skip + i}]"
            )
        if skip:
            assert not torch.equal(seen[0][0], stream[0][0])  # the stream's batches differ: not vacuous
        first = draw(trainer, trainer.loader, 1)[0]  # training's loader was rebuilt: the stream's start
        assert torch.equal(first[0], stream[0][0]) and torch.equal(first[1], stream[0][1])


def test_skipping_a_batch_equals_priming_after_drawing_it_and_changes_the_kept_momentum(
    tmp_path, shard_dir, tokenizer_model, compose
):
    momenta = {}
    for name, skip, predraw in (("skip1", 1, 0), ("drawn", 0, 1), ("skip0", 0, 0)):
        with built_trainer(tmp_path / name, shard_dir, tokenizer_model, compose, skip) as trainer:
            draw(trainer, trainer.loader, predraw)  # by hand: what the skip should amount to
            trainer.prime()
            momenta[name] = muon_momentum(trainer)
    assert momenta["skip1"], "priming left no Muon momentum to compare"
    assert len(momenta["skip1"]) == len(momenta["drawn"]) == len(momenta["skip0"])
    for a, b in zip(momenta["skip1"], momenta["drawn"]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(momenta["skip1"], momenta["skip0"]))
