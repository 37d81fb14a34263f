"""Worker entry: `python -m pgolf.train <job_dir>` (or under torchrun). Never imports Hydra.

Reads `<job_dir>/config.json`, trains, and writes `<job_dir>/result.json` atomically on rank 0,
also when the run fails (status "failed" with the error), so a sweep never loses track of a job.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from pgolf.config import job_config_from_dict
from pgolf.results import read_json, write_json_atomic


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _finish_together() -> None:
    """Wait for every rank before teardown: a rank that destroys the process group while a peer is
    still in its last collective makes the peer's gloo/NCCL threads abort the process (seen as a
    rare SIGABRT at exit on CPU). Success path only; a failed rank must not wait for the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
        if _rank() == 0:
            partial = dict(trainer.result) if trainer is not None else {}
            partial.update(
                status="failed",
                error=f"{type(e).__name__}: {e}",
                traceback=traceback.format_exc()[-4000:],
            )
            if trainer is not None:
                partial["timings"] = dict(trainer.timer.seconds)
            write_json_atomic(job_dir / "result.json", partial)
            if trainer is not None:
                trainer.log(f"FAILED {type(e).__name__}: {e}")
        else:  # other ranks leave their error where the parent will find it
            err = job_dir / "ranks" / f"rank{_rank()}_error.txt"
            err.parent.mkdir(exist_ok=True)
            err.write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-4000:]}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


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
    write_json_atomic(job_dir / "config.json", cfg)
    run_job(job_dir)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pgolf.train <job_dir holding config.json>")
    from pgolf.console import worker_logging  # never shipped: a packed script starts in run_packed

    worker_logging()
    try:
        run_job(sys.argv[1])
    except Exception as e:
        print(f"pgolf.train: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
