"""Distribution: 2 gloo processes at the same global batch train like 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_cpu_args

pytestmark = pytest.mark.slow

# The two runs see the same micro-batches and do the same math, but DDP sums the gradients of the
# two ranks in another order than one process accumulating 8 micro-batches. Those last-bit fp32
# differences pass through Muon's bf16 Newton-Schulz, whose rounding can then differ on a few
# elements: measured drift is ~2e-5 relative by step 6. A real bug (a rank reading other data, a
# missing gradient average, a wrong accumulation factor) moves losses by >1e-2; the negative
# control below shows a 10% learning-rate change already exceeds the tolerance.
REL_TOL = 5e-4


def _run(tmp_path, shard_dir, tokenizer_model, name, **extra):
    d = tmp_path / name
    proc = run_cli(tiny_cpu_args(shard_dir, tokenizer_model, **extra), d, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((d / "run" / "result.json").read_text())


def _max_rel_diff(a: dict, b: dict) -> float:
    assert [s for s, _ in a["train_losses"]] == [s for s, _ in b["train_losses"]]
    diffs = [abs(x - y) / abs(x) for (_, x), (_, y) in zip(a["train_losses"], b["train_losses"])]
    return max(diffs + [abs(a["val_loss"] - b["val_loss"]) / a["val_loss"]])


def test_two_gloo_processes_match_one(tiny_run, tmp_path, shard_dir, tokenizer_model):
    # One process: the session's tiny run (nproc_per_node 1 is the cpu default). Its threads differ
    # from the ranks' single thread, which moves fp32 sums by ~1e-7 relative, far inside REL_TOL.
    one = json.loads((tiny_run[0] / "run" / "result.json").read_text())
    two = _run(tmp_path, shard_dir, tokenizer_model, "n2", **{"hardware.nproc_per_node": "2"})
    assert (one["world_size"], one["grad_accum"]) == (1, 8)
    assert (two["world_size"], two["grad_accum"]) == (2, 4)
    assert one["train_losses"][0] == pytest.approx(two["train_losses"][0], rel=1e-6)  # before any update
    assert _max_rel_diff(one, two) < REL_TOL
    assert two["val_bpb"] == pytest.approx(one["val_bpb"], rel=REL_TOL)

    control = _run(
        tmp_path,
        shard_dir,
        tokenizer_model,
        "lr",
        **{"hardware.nproc_per_node": "1", "optimizer.matrix_lr": "0.044"},
    )
    assert _max_rel_diff(one, control) > REL_TOL


# Each rank as the worker runs it: the runtime (process group), a first optimizer (torch.optim
# imports torch._dynamo then), a collective, and pgolf.train's teardown; then the gloo threads left.
_TEARDOWN_RANK = """
    import json
    import os
    import sys
    import torch
    import torch.distributed as dist
    from pgolf.hw.config import CpuHardwareConfig
    from pgolf.hw.device import build
    from pgolf.train import _finish_together, _leave_process_group

    def gloo_threads():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return sorted(n for n in names if "gloo" in n)

    rt = build(CpuHardwareConfig(nproc_per_node=2, threads=1))
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2.0
    running = gloo_threads()
    _finish_together()
    _leave_process_group()
    out = {"running": running, "after_teardown": gloo_threads()}
    open(os.path.join(sys.argv[1], f"rank{rt.rank}.json"), "w").write(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux /proc")
def test_teardown_frees_the_process_group(tmp_path):
    """After the worker's teardown no gloo thread is left. A group still referenced (e.g. bound as
    a default argument by a torch module imported after init) outlives destroy_process_group, and
    its threads running into interpreter exit made a finished rank abort now and then (SIGABRT,
    "terminate called without an active exception")."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(_TEARDOWN_RANK))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script), str(tmp_path)]
    # a script's own folder leads its sys.path, not the cwd: this checkout's pgolf, as `-m` would import
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert threads["running"], threads  # the probe sees the group's threads while it lives
        assert threads["after_teardown"] == [], f"rank {rank}: {threads}"
