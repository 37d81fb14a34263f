"""The wallclock stop rule never lets a step end past the training cap when step times vary.

`simulate` replays the training loop's protocol (pgolf.trainer.Trainer.train: vote after a step,
flags read at once on CPU or one step later on CUDA, the run ends on the agreed step, and the
clock stops once the device is idle) over given step times. The rule the loop used before costed
the next step at the mean step time; a run whose steps slow down near the end, or that meets one
slow step, then ended past the cap. The end-to-end test drives the real loop on a virtual clock
and checks the result's rules verdict.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import tiny_cpu_args

from pgolf import trainer as trainer_module
from pgolf.config import job_config_from_dict
from pgolf.loop import STEP_MARGIN, StopRule
from pgolf.trainer import RulesBroken


class MeanStopRule(StopRule):
    """The rule before: the next step costed at the mean of all steps so far."""

    def vote(self, step: int, done_ms: float) -> float:
        completed = step - self.in_flight
        if self.cap_ms is None or completed <= 0:
            return 0.0
        left = (step - completed) + self.lookahead
        return float(done_ms + (left + 1) * done_ms / completed >= self.cap_ms)


def simulate(rule: StopRule, step_ms: Callable[[int], float], cuda: bool) -> tuple[int, float]:
    """(steps run, training ms when the device went idle) under `rule`, as the loop drives it:
    on CUDA the host reads a step's flags after queueing the next step, having waited only for the
    step before; on CPU a step's flags come back at once."""
    end = [0.0]  # device time at which step i ended (end[0]: the clock's start)
    step, pending = 0, None
    while not rule.is_last(step):
        end.append(end[-1] + step_ms(step))  # queued now, runs after the step before
        step += 1
        if cuda:
            if pending is not None:  # flags.previous(): waits for step - 1
                rule.agree(bool(pending), step - 1)
            done = end[step - 1]
            pending = rule.vote(step, done)
        else:
            rule.agree(bool(rule.vote(step, end[step])), step)
    return step, end[step]


SCENARIOS = {  # step ms of step i, and the cap in ms
    # a graph switch late in training (depth recurrence, late QAT) makes every later step slower
    "late_slowdown": (lambda i: 100.0 if i < 40 else 200.0, 6100.0),
    # noisy steps: every fourth one is slow, and the run ends on one of them
    "jitter": (lambda i: 160.0 if i % 4 == 3 else 100.0, 6070.0),
    # steps that drift slower the whole run
    "drift": (lambda i: 50.0 + 5.0 * i, 6200.0),
}


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_mean_rule_overshoots_and_the_new_rule_does_not(scenario, cuda):
    step_ms, cap = SCENARIOS[scenario]
    in_flight, lookahead = int(cuda), 1

    steps_old, ms_old = simulate(MeanStopRule(10**6, cap, in_flight, lookahead), step_ms, cuda)
    steps_new, ms_new = simulate(StopRule(10**6, cap, in_flight, lookahead), step_ms, cuda)
    assert ms_old > cap, f"the mean rule fit this scenario ({ms_old:.0f} ms): not a test"
    assert ms_new <= cap
    # and the new rule gives up little: the steps it left would not all have fit
    assert ms_new + (lookahead + 2) * STEP_MARGIN * max(map(step_ms, range(steps_new + 3))) > cap
    assert steps_new < steps_old


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("lookahead", [1, 2])
def test_steady_steps_end_inside_the_cap_and_close_to_it(cuda, lookahead):
    """Constant 100 ms steps: never past the cap, and the margin costs at most a few steps."""
    for cap in (950.0, 6000.0, 6049.0, 60_000.0):
        steps, ms = simulate(StopRule(10**6, cap, int(cuda), lookahead), lambda i: 100.0, cuda)
        assert ms <= cap
        assert ms > cap - 100.0 * (lookahead + 2) * STEP_MARGIN, (cap, steps, ms)


def test_a_steps_run_ignores_the_clock():
    rule = StopRule(25, None, 0, 1)
    assert simulate(rule, lambda i: 1e6, cuda=False)[0] == 25
    assert rule.stopped_by(25) == "iterations"


class StepClock:
    """`time` for the trainer module: only a training step moves the clock, by `step_s(step)`."""

    def __init__(self, step_s: Callable[[int], float]):
        self.step_s, self.now, self.steps = step_s, 1000.0, 0

    def perf_counter(self) -> float:
        return self.now


def _run_on_virtual_clock(tmp_path, shard_dir, tokenizer_model, compose, monkeypatch, step_s) -> dict:
    """A CPU run under budget.mode=wallclock whose steps take `step_s(i)` seconds of a virtual
    clock, with no reserve (this quant does not calibrate): an overshoot breaks train_seconds."""
    clock = StepClock(step_s)
    monkeypatch.setattr(trainer_module, "time", clock)
    real_step = trainer_module.Trainer._train_step

    def timed_step(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        clock.now += clock.step_s(clock.steps)
        clock.steps += 1
        return loss

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", timed_step)
    overrides = tiny_cpu_args(
        shard_dir,
        tokenizer_model,
        **{
            "budget.mode": "wallclock",
            "budget.train_seconds": "3.0",
            "budget.quant_reserve_seconds": "0",
            "train.iterations": "100000",
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
        return trainer.run()
    finally:
        trainer.close()
        torch.set_num_threads(threads)  # the runtime set this process's threads; give them back


def late_slowdown(i: int) -> float:
    return 0.1 if i < 20 else 0.18


def test_slower_late_steps_stay_inside_train_seconds_end_to_end(
    tmp_path, shard_dir, tokenizer_model, compose, monkeypatch
):
    """Steps of 100 ms that slow to 180 ms after 20: the loop stops in time, and the result's
    rules verdict charges training plus calibration within budget.train_seconds."""
    res = _run_on_virtual_clock(tmp_path, shard_dir, tokenizer_model, compose, monkeypatch, late_slowdown)
    assert (res["status"], res["stopped_by"]) == ("ok", "wallclock")
    expected_ms = 1000.0 * sum(late_slowdown(i) for i in range(res["steps"]))
    assert res["train_ms"] == pytest.approx(expected_ms)
    check = res["rules"]["checks"]["train_seconds"]
    assert check["used"] == pytest.approx(res["train_ms"] / 1000.0 + res.get("calibration_seconds", 0.0))
    assert check["held"] and check["used"] <= check["limit"] == 3.0
    assert res["rules"]["pass"], res["rules"]["reason"]


def test_the_mean_rule_would_have_failed_the_same_run(
    tmp_path, shard_dir, tokenizer_model, compose, monkeypatch
):
    """The same run under the old rule trains past budget.train_seconds, which fails the run."""
    monkeypatch.setattr(trainer_module, "StopRule", MeanStopRule)
    with pytest.raises(RulesBroken, match="train_seconds"):
        _run_on_virtual_clock(tmp_path, shard_dir, tokenizer_model, compose, monkeypatch, late_slowdown)
