"""Worker entry: `python -m pgolf.train <job_dir>` (or under torchrun). Never imports Hydra.

Reads `<job_dir>/config.json`, trains, and writes `<job_dir>/result.json` atomically on rank 0,
also when the run fails (status "failed" with the error), so a sweep never loses track of a job.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from pgolf.config import job_config_from_dict, to_dict
from pgolf.results import DiskFullError, disk_full, is_disk_full, read_json, write_json_atomic
from pgolf.run_result import RunResult


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _finish_together() -> None:
    """Wait for every rank before teardown: a rank that destroys the process group while a peer is
    still in its last collective makes the peer's gloo/NCCL threads abort the process (seen as a
    rare SIGABRT at exit on CPU). Success path only; a failed rank must not wait for the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _leave_process_group() -> None:
    """Destroy the process group, on every exit path. (A function of its own: the packed code is
    20 bytes smaller than with these lines inline in run_job's `finally`.)"""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def describe_error(e: BaseException, job_dir: Path | None = None) -> str:
    """The `error` of a failed result.json: what happened, in words a user acts on."""
    if isinstance(e, KeyboardInterrupt):
        return (
            "interrupted by the user (Ctrl-C / SIGINT); resume=<job_dir> runs it again "
            "(from its checkpoint, if any)"
        )
    if is_disk_full(e) and not isinstance(e, DiskFullError):  # a write outside the atomic writers (a log)
        where = getattr(e, "filename", None) or job_dir or "."
        return f"DiskFullError: {disk_full(where, None)}"
    return f"{type(e).__name__}: {e}"


def run_job(job_dir: str | Path) -> dict:
    job_dir = Path(job_dir)
    trainer = None
    try:
        job = job_config_from_dict(read_json(job_dir / "config.json"))
        from pgolf.trainer import Trainer  # torch is imported here, after the config is known good

        trainer = Trainer(job, job_dir)
        result = trainer.run()
        trainer.write_result()
        _finish_together()
        return result
    except BaseException as e:
        error = describe_error(e, job_dir)
        # Recording the failure must not bury it: on a full disk these writes fail too, and their
        # errors would be chained onto the original one. A note on stderr is all they get.
        try:
            if _rank() == 0:
                partial = trainer.result if trainer is not None else RunResult()
                partial.status, partial.error = "failed", error
                partial.traceback = traceback.format_exc()[-4000:]
                if trainer is not None:
                    partial.timings = dict(trainer.timer.seconds)
                partial.write(job_dir / "result.json")
                if trainer is not None:
                    trainer.log(f"FAILED {error}")
            else:  # other ranks leave their error where the parent will find it
                err = job_dir / "ranks" / f"rank{_rank()}_error.txt"
                err.parent.mkdir(exist_ok=True)
                err.write_text(f"{error}\n{traceback.format_exc()[-4000:]}")
        except OSError as record_error:
            why = "no space left on the device" if is_disk_full(record_error) else str(record_error)
            print(f"pgolf: {error} ({job_dir / 'result.json'} not written either: {why})", file=sys.stderr)
        raise
    finally:
        if trainer is not None:
            try:
                trainer.close()
            except OSError as close_error:  # e.g. flushing the log to a full disk: never hide the real error
                print(
                    f"pgolf: closing the run failed: {describe_error(close_error, job_dir)}", file=sys.stderr
                )
        _leave_process_group()


def run_packed(config_path: str, script: str | None = None) -> None:
    """Entry of a packed `train_gpt.py` (`script`, whose size is the run's code bytes): the embedded
    config, with the challenge's env overrides."""
    import json
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")  # plain lines
    if script is not None:
        from pgolf import shipped

        shipped.PACKED_SCRIPT = Path(script).resolve()

    cfg = json.loads(Path(config_path).read_text())
    if "SEED" in os.environ:
        cfg["seed"] = int(os.environ["SEED"])
    if "DATA_PATH" in os.environ:
        cfg["data"] = {**cfg["data"], "name": "shards", "path": os.environ["DATA_PATH"]}
        cfg["data"].pop("cache_dir", None)
        cfg["data"].pop("val_docs", None)
    if "TOKENIZER_PATH" in os.environ:
        cfg["data"]["tokenizer_path"] = os.environ["TOKENIZER_PATH"]
    job_dir = Path(os.environ.get("PGOLF_JOB_DIR", "pgolf_run")).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    cfg["job_dir"] = str(job_dir)
    # The wrapper carries only what differs from the defaults; the job dir gets the whole config.
    write_json_atomic(job_dir / "config.json", to_dict(job_config_from_dict(cfg)))
    run_job(job_dir)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pgolf.train <job_dir holding config.json>")
    from pgolf.parent.console import worker_logging  # never shipped: a packed script starts in run_packed

    worker_logging()
    code = 0
    try:
        run_job(sys.argv[1])
    except KeyboardInterrupt as e:
        print(f"pgolf.train: {describe_error(e)}", file=sys.stderr)
        code = 130  # the shell's code for a SIGINT
    except Exception as e:
        print(f"pgolf.train: {describe_error(e)}", file=sys.stderr)
        code = 1
    _exit_now(code)


def _exit_now(code: int) -> None:
    """End the worker with `code` once everything it writes is flushed, without the interpreter's
    teardown. torch modules keep the (destroyed) process group alive (torch.distributed.nn binds it
    as a default argument), so its gloo threads reach interpreter exit, where a rank that finished
    cleanly now and then aborted ("terminate called without an active exception", SIGABRT: a CI
    flake). Letting the group be freed instead moves its destructor into the run: a rank whose
    peer had already exited then waited in it forever. result.json is written atomically before
    this point, so there is nothing left to lose."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
