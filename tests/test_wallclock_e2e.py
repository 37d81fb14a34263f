"""budget.mode=wallclock, as every challenge run trains: the clock stops training, not
train.iterations; the reserve for GPTQ calibration comes off that clock (budget.quant_reserve_seconds,
raised to the calibration probe's measurement when that is larger) and calibration runs in it;
result.json's timings stay inside the budget; and in a 2-process run the ranks stop on one shared vote.

The first test drives the real training loop on a virtual clock (each step takes exactly 125 ms), so
where it stops is exact. The end-to-end runs have a few seconds of budget (train.iterations is out
of reach) and cost ~10-20 s each on CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_cpu_args

from pgolf import trainer as trainer_module
from pgolf.config import job_config_from_dict
from pgolf.trainer import CALIBRATION_MARGIN

FAST_CLOCK = Path(__file__).parent / "_fast_clock"  # sitecustomize.py: one rank's clock runs fast
ITERATIONS = 100_000  # never reached: the clock must stop the run
TRAIN_SECONDS, RESERVE = 7.0, 3.0
# The stop is predicted from the slowest recent step with a margin (pgolf.loop.StopRule), so only a
# step over 1.25x the recent ones can overshoot: real CPU steps on a shared machine sometimes are,
# and a few tiny CPU steps fit in this slack. Ignoring the reserve would overshoot by the whole
# reserve (3 s).
OVERSHOOT_MS = 1000.0


class StepClock:
    """`time` for the trainer module: only a training step moves the clock, by exactly `step_s`."""

    def __init__(self, step_s: float):
        self.step_s = step_s
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def test_the_clock_stops_on_the_last_step_that_surely_fits(
    tmp_path, shard_dir, tokenizer_model, compose, monkeypatch
):
    """125 ms steps and 7.06 s - 2 s reserve = 5.06 s: 40 steps end at 5.000 s, a 41st would end past
    the cap (5.125 s), and ignoring the reserve would allow 56. The rule costs a step at 1.25x the
    slowest recent one, so the 40th fits only if it is no slower than the others: the loop must
    stop after exactly 39 (4.875 s), and result.json charges the time that ran: 4.875 s of training
    plus the GPTQ calibration (none for this quant) of 7.06 s."""
    clock = StepClock(0.125)
    monkeypatch.setattr(trainer_module, "time", clock)
    real_step = trainer_module.Trainer._train_step

    def timed_step(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        clock.now += clock.step_s
        return loss

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", timed_step)
    overrides = tiny_cpu_args(
        shard_dir,
        tokenizer_model,
        **{
            "budget.mode": "wallclock",
            "budget.train_seconds": "7.06",
            "budget.quant_reserve_seconds": "2",
            "train.iterations": str(ITERATIONS),
            "train.prime_steps": "0",
            "train.log_every": "0",
            "train.batch_tokens": "512",
            "wandb.mode": "disabled",
            "hardware.threads": "1",
        },
    )
    job = job_config_from_dict({**compose(overrides), "job_dir": str(tmp_path)})
    threads = torch.get_num_threads()
    trainer = trainer_module.Trainer(job, tmp_path)
    try:
        res = trainer.run()
    finally:
        trainer.close()
        torch.set_num_threads(threads)  # the runtime set this process's threads; give them back
    # The reserve the clock ran under: this quant does not calibrate, so no probe raised it.
    reserve = res.get("calibration_plan", {}).get("reserve_seconds", 2.0)
    fits = int((7.06 - reserve) / 0.125 + 1e-9) - 1  # the last one only fits at exactly 125 ms
    assert (reserve, fits) == (2.0, 39)
    assert (res["status"], res["steps"], res["stopped_by"]) == ("ok", fits, "wallclock")
    assert res["train_ms"] == pytest.approx(125.0 * fits)
    used = res["train_ms"] / 1000.0 + res.get("calibration_seconds", 0.0)
    assert used == pytest.approx(4.875)
    assert res["limits"]["train_seconds"] == {
        "limit": 7.06,
        "used": pytest.approx(used),
        "held": True,
        "note": "training plus GPTQ calibration",
    }


def _wallclock_run(tmp_path: Path, shard_dir, tokenizer_model, name: str, env=None, **extra) -> dict:
    args = tiny_cpu_args(
        shard_dir,
        tokenizer_model,
        **{
            "budget.mode": "wallclock",
            "budget.train_seconds": str(TRAIN_SECONDS),
            "budget.quant_reserve_seconds": str(RESERVE),
            "train.iterations": str(ITERATIONS),
            "train.log_every": "0",
            "hardware.threads": "1",  # steady step times on a shared 2-core machine
            # GPTQ, so the calibration the reserve pays for really runs (also across ranks)
            "quant": "int6_gptq",
            "quant.keep_float_max_numel": "1024",
            "quant.calibration.batches": "2",
            **extra,
        },
    )
    d = tmp_path / name
    proc = run_cli(args, d, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((d / "run" / "result.json").read_text())


def _assert_clock_stopped_in_budget(res: dict) -> float:
    """The checks every wallclock run must pass; returns the training clock's cap in ms."""
    assert res["status"] == "ok"
    assert res["stopped_by"] == "wallclock" and 0 < res["steps"] < ITERATIONS
    # The probe timed GPTQ before the clock started: budget.quant_reserve_seconds is a floor that
    # the measured cost (with its margin) raises. The clock ran under that effective reserve.
    plan = res["calibration_plan"]
    assert plan["configured_reserve_seconds"] == RESERVE
    reserve = plan["reserve_seconds"]
    assert reserve == pytest.approx(max(RESERVE, CALIBRATION_MARGIN * plan["estimate_seconds"]))
    cap_ms = 1000.0 * (TRAIN_SECONDS - reserve)
    assert res["train_ms"] <= cap_ms + OVERSHOOT_MS, "training ran into the quantization reserve"
    # GPTQ ran after the clock, inside the reserve; result.json charges training plus calibration
    assert 0 < res["calibration_seconds"] <= reserve
    lim = res["limits"]["train_seconds"]
    assert lim["limit"] == TRAIN_SECONDS
    assert lim["used"] == pytest.approx(res["train_ms"] / 1000.0 + res["calibration_seconds"])
    assert lim["held"] and lim["used"] <= TRAIN_SECONDS
    assert res["limits"]["eval_seconds"]["held"]
    # The phase timers agree with the clock: the train phase is the clock plus the pre-quant
    # validation after it, never less than the clock itself.
    assert res["timings"]["train"] >= res["train_ms"] / 1000.0
    return cap_ms


@pytest.mark.slow
def test_one_process_stops_by_the_clock_before_the_reserve(tmp_path, shard_dir, tokenizer_model):
    res = _wallclock_run(tmp_path, shard_dir, tokenizer_model, "n1")
    cap_ms = _assert_clock_stopped_in_budget(res)
    # Stopped near the cap, not at some other early point: most of the clock was used.
    assert res["train_ms"] >= 0.6 * cap_ms
    assert res["steps"] >= 5


@pytest.mark.slow
def test_two_ranks_stop_together_on_the_fastest_clock(tmp_path, shard_dir, tokenizer_model):
    """Rank 1's clock runs 2x fast, so only rank 1 sees the cap at half the real time. Rank 0 must
    stop at the same step (a rank that stopped alone would leave the other waiting in a DDP
    all-reduce, or pair the wrong collectives): rank 0's own clock (train_ms, which rank 0
    reports) then shows about half the cap."""
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(FAST_CLOCK), os.environ.get("PYTHONPATH")) if p),
        "PGOLF_TEST_FAST_CLOCK": "1:2.0",
        "OMP_NUM_THREADS": "1",
    }
    res = _wallclock_run(
        tmp_path, shard_dir, tokenizer_model, "n2", env=env, **{"hardware.nproc_per_node": "2"}
    )
    assert res["world_size"] == 2
    cap_ms = _assert_clock_stopped_in_budget(res)
    assert res["train_ms"] <= 0.5 * cap_ms + OVERSHOOT_MS, "rank 0 did not stop on rank 1's vote"
    assert res["train_ms"] >= 0.25 * cap_ms and res["steps"] >= 3
