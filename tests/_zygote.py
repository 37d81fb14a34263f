"""A fork server for the tests' CLI runs: `python -m pgolf.run ...` without paying its imports again.

Every end-to-end test starts `python -m pgolf.run` (or `python -c <script>`), and each such process
spends about 4.5 s on a 2-core CI machine importing torch, torch._dynamo (which torch.optim's
constructors import), Hydra and pgolf before it does any work: about a third of a tiny run. This
process imports them once, then forks one child per run. The child is the same interpreter state a
fresh `python -m pgolf.run` has after its imports, with the run's working directory, environment,
argv and standard streams: it runs the module as `__main__` exactly as `-m` does and exits with its
status.

What a fork cannot give a child is what a module reads at import time: torch reads TORCH_LOGS,
the TORCHINDUCTOR_* and TRITON_* settings then, and OpenMP its thread count. `conftest.run_cli` uses
this server only when a run's environment agrees with the server's on every such variable
(`IMPORT_TIME_PREFIXES`), and starts a real process otherwise; the README's own commands are tested
as real processes too. The server itself never runs a tensor op or a compile, so each child starts
with torch's thread pool and Dynamo's caches as untouched as a new process's.

Protocol, one JSON line each way on stdin/stdout: the request {flag ("-m" or "-c"), target (the
module or the script), argv, cwd, env, out, err}; the answers {"pid"} when the child starts and {"returncode"} when it ends.
"""

from __future__ import annotations

import json
import os
import sys

# Variables read when torch, Triton or OpenMP load (or, for OMP_NUM_THREADS, applied by the child
# through torch.set_num_threads below): a run that sets them differently needs a fresh process.
IMPORT_TIME_PREFIXES = ("TORCH", "PYTORCH", "TRITON", "KMP_", "MKL_", "CUDA", "NCCL", "PYTHON")
# ... except these, read when used: Inductor sets its cache folder's variable in the test process
# after a compile there, and resolves the folder from the environment each time it needs it.
READ_WHEN_USED = {"TORCHINDUCTOR_CACHE_DIR"}


def _preload() -> None:
    """What `python -m pgolf.run` imports before its first step: torch with Dynamo, Hydra, the
    parent and the trainer. Imports only: no tensor is made here."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (torch.optim's constructors import it on first use)
    import torch.distributed  # noqa: F401

    import pgolf.parent.pack  # noqa: F401
    import pgolf.parent.run  # noqa: F401
    import pgolf.train  # noqa: F401
    import pgolf.trainer  # noqa: F401


def _child(req: dict) -> int:
    """In the forked child: become the requested process and run it; its exit status."""
    import runpy
    import traceback

    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    if "OMP_NUM_THREADS" in req["env"]:  # OpenMP read the server's value when torch loaded
        import torch

        torch.set_num_threads(int(req["env"]["OMP_NUM_THREADS"]))
    sys.path[0] = req["cwd"]  # `-m` and `-c` put the working directory first
    sys.argv = list(req["argv"])
    try:
        if req["flag"] == "-m":
            runpy.run_module(req["target"], run_name="__main__", alter_sys=True)
        else:
            exec(compile(req["target"], "<string>", "exec"), {"__name__": "__main__"})
        code = 0
    except SystemExit as e:  # as the interpreter exits: None is 0, an int is itself, else printed and 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    return code


def serve() -> None:
    proto_in = sys.stdin.buffer
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    _preload()
    proto_out.write(json.dumps({"ready": True}) + "\n")
    for line in proto_in:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            proto_out.close()
            code = _child(req)
            # The normal interpreter exit: atexit hooks, flushed streams, as a process of its own.
            sys.stdout.flush()
            sys.stderr.flush()
            raise SystemExit(code)
        proto_out.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        proto_out.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
