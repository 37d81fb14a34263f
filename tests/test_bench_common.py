"""bench/common.sh helpers the GPU benches rely on for honest timings (run on CPU, no GPU needed).

A seed bench run once measured `experiment=pr339` at 1440 ms/step, 2.1x its 680 ms: the run shared
the GPU with one that an earlier device call had started with `setsid`. The device machine ends
every process of a command's session when the command returns or runs out of time, but lets a new
session run on. These tests play the machine's part: they end the caller's session and check that
nothing run_cut started outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "bench" / "common.sh"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a live process, None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
    return fields[0], int(fields[3])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # a zombie no longer runs


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _end_session(sid: int) -> None:
    """What the device machine does when a command returns: SIGKILL every process of its session."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] == sid:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _bench_shell(script: str, tmp_path: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    full = f'REPO={REPO}; source "{COMMON}"; {script}'
    return subprocess.Popen(
        ["bash", "-c", full], cwd=tmp_path, env=dict(os.environ, **(env or {})), text=True, **kw
    )


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_run_cut_child_dies_with_the_calling_session(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The child records its pid, then runs far longer than the test (never printing the pattern).
    child = f"bash -c 'echo $$ > {pid_file}; exec sleep 300'"
    shell = _bench_shell(
        f'run_cut "{tmp_path}/run.out" NEVER_PRINTED {child}', tmp_path, start_new_session=True
    )
    try:
        assert _wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10), (
            "child never started"
        )
        child_pid = int(pid_file.read_text())
        assert _alive(child_pid)
        _end_session(shell.pid)  # the calling command ran out of time
        shell.wait(timeout=10)
        survived = not _wait_for(lambda: not _alive(child_pid), 5)
    finally:
        if shell.poll() is None:
            shell.kill()
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the test's own child, by its pid
    assert not survived, (
        "run_cut's run outlived the session that started it: on the device machine it would go on using "
        "the GPU during the next call (setsid?)"
    )


def test_run_cut_stops_the_whole_group_once_the_pattern_appears(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # A launcher whose worker (the grandchild) keeps running, as torchrun's do.
    child = f"bash -c 'sleep 300 & echo $! > {pid_file}; echo trained 3 steps in 1s; wait'"
    shell = _bench_shell(f'run_cut "{tmp_path}/run.out" "trained [0-9]+ steps in" {child}', tmp_path)
    try:
        shell.wait(timeout=30)
        worker = int(pid_file.read_text())
        assert _wait_for(lambda: not _alive(worker), 5), "the launcher's worker survived the cut"
    finally:
        if shell.poll() is None:
            shell.kill()
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert shell.returncode == 0
    assert "trained 3 steps" in (tmp_path / "run.out").read_text()


def test_run_cut_with_an_empty_pattern_stops_only_at_the_time_limit(tmp_path):
    """bench/e2e.sh's RUN_LIMIT: the run goes on past its output (grep -E "" would match any line)
    and is stopped only when the limit passes, its output kept."""
    child = "bash -c 'echo phase:build done in 0.1s; sleep 2; echo phase:prime done in 2.0s; exec sleep 300'"
    shell = _bench_shell(f'RUN_LIMIT=4 STOP_GRACE=2 run_cut "{tmp_path}/run.out" "" {child}', tmp_path)
    try:
        shell.wait(timeout=30)
    finally:
        if shell.poll() is None:
            shell.kill()
    out = (tmp_path / "run.out").read_text()
    assert "phase:prime done" in out, "the empty pattern cut the run at its first line"
    assert shell.returncode == 0


def _fake_nvidia_smi(tmp_path: Path, used_mib: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text(
        "#!/bin/sh\n"
        'case "$*" in *query-gpu=memory.used*) echo ' + str(used_mib) + " ;;\n"
        "  *query-compute-apps*) echo '4242, python3, " + str(used_mib) + " MiB' ;; esac\n"
    )
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GPU_IDLE_WAIT": "0"}


@pytest.mark.parametrize("used_mib, idle", [(3, True), (22300, False)])
def test_bench_gpu_idle_refuses_a_gpu_another_process_holds(tmp_path, used_mib, idle):
    shell = _bench_shell(
        "bench_gpu_idle", tmp_path, _fake_nvidia_smi(tmp_path, used_mib), stderr=subprocess.PIPE
    )
    _, err = shell.communicate(timeout=30)
    assert (shell.returncode == 0) == idle
    if not idle:
        assert "GPU busy: 22300 MiB" in err and "4242" in err


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_bench_gpu_idle_ends_a_run_an_earlier_call_left_and_nothing_else(tmp_path):
    """A device call that hit its limit left its torchrun worker on the GPU; the next call's first
    idle check ends it (its command line names this repo) and goes on, and leaves any other GPU
    process alone."""
    stray = subprocess.Popen(["bash", "-c", 'exec -a "$0" sleep 300', f"{REPO}/.refs/pr339/train_gpt.py"])
    other = subprocess.Popen(["bash", "-c", 'exec -a "$0" sleep 300', "/opt/elsewhere/serve.py"], cwd="/")
    try:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        tool = bin_dir / "nvidia-smi"
        tool.write_text(  # the GPU is busy while the stray lives; both show as compute apps
            "#!/bin/sh\n"
            'case "$*" in *query-gpu=memory.used*) '
            f'case "$(ps -o stat= -p {stray.pid})" in ""|Z*) echo 3 ;; *) echo 22300 ;; esac ;;\n'
            f'  *"query-compute-apps=pid "*) echo {stray.pid}; echo {other.pid} ;;\n'
            "  *query-compute-apps*) echo busy ;; esac\n"
        )
        tool.chmod(0o755)
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GPU_IDLE_WAIT": "10"}
        shell = _bench_shell("bench_gpu_idle", tmp_path, env, stderr=subprocess.PIPE)
        _, err = shell.communicate(timeout=30)
        assert shell.returncode == 0, err
        assert f"ending a run an earlier call left on the GPU: {stray.pid}" in err
        assert _wait_for(lambda: stray.poll() is not None, 5)
        assert other.poll() is None, "a process of something else was ended"
    finally:
        for proc in (stray, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("ignores_term", [False, True])
def test_run_cut_time_limit_reaches_a_worker_in_its_own_session(tmp_path, ignores_term):
    """torchrun starts its workers in new sessions: a KILL of the launcher's group missed the worker,
    which held the GPU into the next run. At the time limit every descendant must end, a worker that
    ignores TERM too (it gets KILL after the grace period)."""
    pid_file = tmp_path / "worker.pid"
    trap = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignores_term else ""
    worker = f"{trap}import time; time.sleep(300)"
    launcher = (
        "import subprocess, sys; "
        f"w = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(w.pid)); w.wait()"
    )
    script = f'RUN_LIMIT=1 STOP_GRACE=2 run_cut "{tmp_path}/run.out" NEVER_PRINTED python3 -c "{launcher}"'
    shell = _bench_shell(script, tmp_path)
    try:
        shell.wait(timeout=60)
        worker_pid = int(pid_file.read_text())
        gone = _wait_for(lambda: not _alive(worker_pid), 5)
    finally:
        if shell.poll() is None:
            shell.kill()
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert gone, "the worker outlived run_cut's time limit: the next run would share the GPU"


def _seeds_function(name: str) -> str:
    """The definition of bench/seeds.sh's shell function `name`, to run on its own."""
    fn = subprocess.run(
        ["sed", "-n", f"/^{name}()/,/^}}/p", str(REPO / "bench" / "seeds.sh")], capture_output=True, text=True
    ).stdout
    assert fn.startswith(f"{name}()"), f"bench/seeds.sh defines no {name}()"
    return fn


def _ref_script(tmp_path: Path, pr: str, source: str, **env: str) -> subprocess.CompletedProcess:
    """bench/seeds.sh's ref_script over a fake .refs/<pr>/train_gpt.py holding `source`."""
    (tmp_path / ".refs" / pr).mkdir(parents=True)
    (tmp_path / ".refs" / pr / "train_gpt.py").write_text(source)
    cmd = f"{_seeds_function('ref_script')}\nref_script {pr}"
    full_env = {**os.environ, "REPO": str(tmp_path), **env}
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=full_env)


MLP_1775 = (
    "class MLP:\n    def __init__(self):\n        self.use_fused = True\n\nblock.mlp.use_fused = True\n"
)


def test_pr1775_reference_runs_its_mlp_unfused_with_fused_mlp_0(tmp_path):
    out = _ref_script(tmp_path, "pr1775", MLP_1775, FUSED_MLP="0")
    assert out.returncode == 0, out.stderr
    copy = Path(out.stdout.strip())
    assert copy != tmp_path / ".refs/pr1775/train_gpt.py"
    assert copy.read_text() == MLP_1775.replace("self.use_fused = True", "self.use_fused = False")


def test_pr1775_reference_as_published_by_default_and_other_prs_untouched(tmp_path):
    out = _ref_script(tmp_path, "pr1775", MLP_1775)
    assert out.stdout.strip() == str(tmp_path / ".refs/pr1775/train_gpt.py")
    out = _ref_script(tmp_path / "b", "pr726", MLP_1775, FUSED_MLP="0")
    assert out.stdout.strip() == str(tmp_path / "b/.refs/pr726/train_gpt.py")


def _pgolf_fused_args(**env: str) -> str:
    cmd = f"{_seeds_function('pgolf_fused_args')}\npgolf_fused_args"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env={**os.environ, **env})
    return out.stdout.strip()


def test_fused_mlp_0_turns_pgolf_training_mlp_off_too():
    """Both sides unfused or both as shipped: never the script unfused against pgolf fused."""
    assert _pgolf_fused_args(FUSED_MLP="0") == "model.fused_mlp_train=false"
    assert _pgolf_fused_args() == "" and _pgolf_fused_args(FUSED_MLP="1") == ""


def test_pr1775_reference_refuses_a_script_without_the_switch(tmp_path):
    out = _ref_script(tmp_path, "pr1775", "class MLP:\n    pass\n", FUSED_MLP="0")
    assert out.returncode != 0 and "switch not found" in out.stderr


def test_levers_passes_env_words_to_the_run_and_the_rest_as_overrides(tmp_path):
    """bench/levers.sh: upper-case NAME=value words of a lever set become the run's environment,
    the others pgolf overrides; the table reads each set's log; one file per set comes back."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "levers.sh").write_text((REPO / "bench" / "levers.sh").read_text())
    (tmp_path / "bench" / "seeds.sh").write_text(  # stands in for the GPU run: logs what it got
        'mkdir -p "$OUT"\n'
        'log="$OUT/pgolf_${PRS}_s1337.out"\n'
        'echo "mix=${TORCHINDUCTOR_MIX_ORDER_REDUCTION:-unset} extra=[$PGOLF_EXTRA]" > "$log"\n'
        'printf "step:50/150 train_loss:3.5 step_avg:500.0ms\\n" >> "$log"\n'
        '[ -n "$PGOLF_EXTRA" ] && echo "throughput: 1,572,864 tokens/s at the median step, 1,500,000 over'
        " the training clock; 228.5 MFLOP/token (fwd+bwd), 359.4 TFLOP/s at the median step; MFU 36.3%"
        ' (median step), 34.7% (whole training) of 989.4 TFLOP/s peak" >> "$log"\n'
        'echo "GPU" > "$OUT/gpu.txt"\n'
    )
    levers = "base|TORCHINDUCTOR_MIX_ORDER_REDUCTION=0 model.fused_ce=true"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "EXP": "pr726", "LEVERS": levers}
    env.pop("TORCHINDUCTOR_MIX_ORDER_REDUCTION", None)
    out = subprocess.run(
        ["bash", str(tmp_path / "bench" / "levers.sh")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "| base | 500.0 | 1.000 | 3.5000 | - | - | - | - |" in out.stdout
    # tokens/s and MFU come from pgolf's throughput line, at the median step
    assert (
        "| TORCHINDUCTOR_MIX_ORDER_REDUCTION=0 model.fused_ce=true | 500.0 | 1.000 | 3.5000 | - | - | 1,572,864 | 36.3% |"
        in out.stdout
    )
    # a device call returns at most 8 files: one log per set and one gpu.txt, no folders
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu.txt", "set0.txt", "set1.txt"]
    logs = [(tmp_path / "out" / f"set{i}.txt").read_text() for i in (0, 1)]
    assert "mix=unset extra=[]" in logs[0] and "step_avg:500.0ms" in logs[0]
    assert "mix=0 extra=[ model.fused_ce=true]" in logs[1]


def _load_fa3_varlen(tmp_path: Path, shim_source: str, name: str):
    """bench/fa3_varlen loaded from a repo laid out under tmp_path, with `shim_source` as the bench's
    .bench/fa3_shim/flash_attn_interface.py (the stand-in loads it from <repo>/.bench)."""
    import importlib.util
    import shutil

    shim = tmp_path / ".bench" / "fa3_shim"
    shim.mkdir(parents=True)
    (shim / "flash_attn_interface.py").write_text(shim_source)
    stand_in = tmp_path / "bench" / "fa3_varlen" / "flash_attn_interface.py"
    stand_in.parent.mkdir(parents=True)
    shutil.copy(REPO / "bench" / "fa3_varlen" / "flash_attn_interface.py", stand_in)
    spec = importlib.util.spec_from_file_location(name, stand_in)
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    return fa


def test_fa3_varlen_stand_in_attends_within_each_segment(tmp_path):
    """bench/fa3_varlen (the seed benches' varlen FA3 stand-in, which both #1775's script and pgolf
    run) against SDPA on each segment alone, with padded cu_seqlens and GQA. It loads the bench
    shim's flash_attn_func from <repo>/.bench/fa3_shim, so the test lays out a repo of its own."""
    import torch
    import torch.nn.functional as F

    fa = _load_fa3_varlen(
        tmp_path, "def flash_attn_func(*a, **k):\n    raise NotImplementedError\n", "fa3_varlen_under_test"
    )
    # The mask is what is under test: eager flex computes the same scores without the ~35 s CPU
    # Inductor compile of the fused kernel (which only pays on a GPU).
    from torch.nn.attention.flex_attention import flex_attention

    fa._flex = flex_attention

    torch.manual_seed(0)
    n, heads, kv_heads, dim = 300, 4, 2, 16
    q, k, v = torch.randn(n, heads, dim), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
    cu = torch.tensor([0, 37, 38, 150, 299, 300, 300, 300], dtype=torch.int32)  # padded, as the records pad
    with torch.no_grad():
        y = fa.flash_attn_varlen_func(q, k, v, cu, cu, 200, 200, causal=True)
    bounds = cu.tolist()
    ref = torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True, enable_gqa=True
            )[0].transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])
            if b > a
        ]
    )
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert fa.flash_attn_func is not None  # the shim's, re-exported
    with pytest.raises(ValueError, match="cu_seqlens_q must equal"):
        fa.flash_attn_varlen_func(q, k, v, cu, cu.flip(0), 200, 200)


def test_fa3_varlen_stand_in_traces_under_torch_compile(tmp_path):
    """The stand-in loads the bench shim from a file path; Dynamo imports the module of every
    function it traces by name, so the shim must be importable by its name (the first GPU run of
    bench/seeds.sh through the stand-in failed in compile without it)."""
    import importlib

    import torch

    sdpa_shim = (
        "import torch.nn.functional as F\n"
        "def flash_attn_func(q, k, v, causal=True, **_):\n"
        "    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),"
        " is_causal=causal)\n"
        "    return y.transpose(1, 2)\n"
    )
    fa = _load_fa3_varlen(tmp_path, sdpa_shim, "fa3_varlen_traced")

    # What torch 2.11's Dynamo does with a traced function's module (2.14's no longer does it here)
    assert importlib.import_module(fa.flash_attn_func.__module__) is fa._shim
    q = torch.randn(2, 8, 4, 16)
    compiled = torch.compile(
        lambda q: fa.flash_attn_func(q, q, q, causal=True), backend="aot_eager", fullgraph=True
    )
    assert torch.allclose(compiled(q), fa.flash_attn_func(q, q, q, causal=True))


def test_profile_pair_finds_every_seeds_function_it_uses():
    """bench/profile_pair.sh runs each side as bench/seeds.sh does by sourcing seeds.sh's functions:
    a renamed or reshaped function there must fail here, not on a GPU."""
    script = (REPO / "bench" / "profile_pair.sh").read_text()
    line = next(x for x in script.splitlines() if x.startswith("source <(sed"))
    names = [
        "sp8192",
        "ref_env",
        "ref_data_env",
        "ref_run_env",
        "pgolf_data_args",
        "ref_script",
        "pgolf_fused_args",
    ]
    cmd = f"REPO={REPO}\n{line}\n" + "\n".join(f"type {n} > /dev/null || exit 1" for n in names)
    cmd += "\nsp8192 pr1532 && ! sp8192 pr726 && [ \"$(ref_env pr1532)\" = 'QK_GAIN_INIT=5.25 TTT_ENABLED=1 TTT_LR=0.005 TTT_EPOCHS=3' ]"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "env, says",
    [({"PRIME": "x"}, "PRIME=x"), ({"PRIME": "0"}, "PRIME=0"), ({"FUSED_MLP": "2"}, "FUSED_MLP=2")],
)
def test_seeds_refuses_a_bad_knob_before_touching_the_gpu(env, says, tmp_path):
    out = subprocess.run(
        ["bash", str(REPO / "bench" / "seeds.sh")],
        capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path / "o"), **env}, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and says in out.stderr and not (tmp_path / "o").exists()
