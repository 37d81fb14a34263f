"""`python -m pgolf.pack <run_dir>`: a finished run -> a submission folder, and a proof that it runs.

The folder holds what a record PR holds: `train_gpt.py` (the run's self-extracting wrapper, byte for
byte: only the modules the worker imported, the frozen config inside), `requirements.txt`,
`submission.json`, a README skeleton and the training log. The code bytes that count are the size
of that `train_gpt.py`; with the run's model bytes they are checked against the cap again.
`--verify` runs the packed script with a fresh Python from an empty directory (no PYTHONPATH, so
only the shipped code can be imported) and compares its metrics with the original run's.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pgolf.parent.check import check_run
from pgolf.parent.result_file import read_result
from pgolf.results import read_json, write_json_atomic, write_text_atomic

# Packages a worker imports, by the names pip installs them under, and what pulls them in.
RUNTIME = {"torch": "torch", "numpy": "numpy", "sentencepiece": "sentencepiece"}
COMPRESSOR_PKG = {"zstd": "zstandard", "brotli": "brotli"}


# Progress lines (stderr); the results are printed to stdout.
log = logging.getLogger("pgolf.pack")


class PackError(RuntimeError):
    pass


def _pin(pkg: str, version: str | None) -> str:
    """`pkg==version` without the local label (`2.13.0+cpu` -> `2.13.0`): no registry serves a
    local build, and a grader installs the registry's build for its own machine (CUDA on Linux).
    The version that ran stays in a comment."""
    if not version:
        return pkg
    public = version.split("+", 1)[0]
    return f"{pkg}=={public}" + (f"  # ran with {version}" if public != version else "")


def requirements(versions: dict[str, str], config: dict) -> str:
    """requirements.txt for the packages that ran (`versions`: result.json's) and the config's extras."""
    v = versions
    lines = [_pin(pkg, v.get(mod)) for mod, pkg in RUNTIME.items()]
    pkg = COMPRESSOR_PKG.get(config.get("quant", {}).get("compressor", ""))
    if pkg:
        lines.append(pkg)
    if config.get("hardware", {}).get("attention") == "fa3":
        lines.append("# flash-attn 3 (hopper build), installed separately")
    return "\n".join(lines) + "\n"


def _config(run_dir: Path) -> dict:
    p = run_dir / "config.json"  # the frozen config the worker read
    return read_json(p) if p.is_file() else {}


def pack(
    run_dir: Path, out: Path | None = None, name: str = "", author: str = "", github_id: str = ""
) -> dict:
    run_dir = Path(run_dir)
    res_path, script = run_dir / "result.json", run_dir / "artifact" / "train_gpt.py"
    if not res_path.is_file():
        raise PackError(f"{res_path} not found: is {run_dir} a pgolf job dir (outputs/runs/...)?")
    result = read_result(res_path)
    if result.status != "ok":
        raise PackError(f"{run_dir} did not finish (status {result.status!r}): {result.error or ''}")
    if result.scored_artifact is not None:  # it holds no artifact of its own to pack
        raise PackError(
            f"{run_dir} is not a legal submission: a re-score of {result.scored_artifact['path']} "
            "(score_artifact); pack the run that trained it"
        )
    if not script.is_file():
        raise PackError(f"{script} is missing; it is written with the artifact at the end of every run")
    # The rules, re-checked from the files (hashes, bytes on disk, shard headers, tokenizer).
    rules = check_run(run_dir)
    if not rules["pass"]:
        raise PackError(
            f"{run_dir} is not a legal submission: {rules['reason']} (python -m pgolf.check {run_dir})"
        )
    out = Path(out) if out else run_dir / "submission"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(script, out / "train_gpt.py")
    code_bytes = (out / "train_gpt.py").stat().st_size
    model_bytes = (run_dir / "artifact" / "final_model.ptz").stat().st_size  # hashed by check_run
    cap = int(result.bytes.cap)
    total = model_bytes + code_bytes
    config = _config(run_dir)
    seed = result.seed
    if (run_dir / "train.log").is_file():
        shutil.copyfile(run_dir / "train.log", out / f"train_seed{seed}.log")
    write_text_atomic(out / "requirements.txt", requirements(result.versions or {}, config))
    held = {k: c["held"] for k, c in rules["checks"].items()}
    sub = {
        "name": name or result.label or f"pgolf {config.get('model', {}).get('name', '')}",
        "val_bpb": result.val_bpb,
        "val_loss": result.val_loss,
        "bytes_total": total,
        "bytes_model": model_bytes,
        "bytes_code": code_bytes,
        "blurb": "",
        "author": author,
        "github_id": github_id,
        "date": datetime.date.today().isoformat(),
        "seeds": {
            str(seed): {
                "val_bpb": result.val_bpb,
                "val_loss": result.val_loss,
                "bytes_total": total,
                "train_time_ms": result.train_ms,
            }
        },
        "config_hash": result.config_hash,
        "platform": (result.versions or {}).get("gpu", "cpu")
        + f", torch {(result.versions or {}).get('torch')}",
        "compliance": {
            "artifact_under_16mb": total <= cap,
            "training_under_600s": held["train_seconds"],
            "eval_under_600s": held["eval_seconds"],
            "ttt_score_first": held["ttt"],
            "whole_val_split": held["val_split"],
            "tokenizer_matches_shards": held["tokenizer"],
        },
    }
    write_json_atomic(out / "submission.json", sub)
    readme = out / "README.md"
    if not readme.exists():  # a skeleton to fill in; never overwrite the author's text
        write_text_atomic(
            readme,
            f"# {sub['name']}\n\n**val_bpb {sub['val_bpb']:.4f}** (seed {seed}), artifact {total:,} bytes "
            f"(model {model_bytes:,} + code {code_bytes:,}; cap {cap:,}).\n\n## What is new\n\nTODO\n\n"
            "## Configuration\n\nPacked by `python -m pgolf.pack`; the full config is inside `train_gpt.py` "
            f"(config hash `{result.config_hash}`).\n\n## Reproduce\n\n```bash\npip install -r requirements.txt\n"
            "DATA_PATH=./data/datasets/fineweb10B_sp1024 TOKENIZER_PATH=./data/tokenizers/fineweb_1024_bpe.model \\\n"
            "  torchrun --standalone --nproc_per_node=8 train_gpt.py\n```\n",
        )
    info = {"dir": str(out), "code_bytes": code_bytes, "model_bytes": model_bytes, "total": total, "cap": cap}
    if total > cap:
        raise PackError(
            f"packed artifact is {total:,} bytes (model {model_bytes:,} + code {code_bytes:,}), over the cap "
            f"of {cap:,} by {total - cap:,}"
        )
    return info


def _run_packed(work: Path, env: dict[str, str], timeout: int) -> tuple[int, str]:
    """Run `train_gpt.py` in `work`, showing its lines as they come (a packed run takes as long as the
    original); its exit code and the tail of its output."""
    proc = subprocess.Popen(
        [sys.executable, "train_gpt.py"],
        cwd=work,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    tail: collections.deque[str] = collections.deque(maxlen=60)

    def show() -> None:
        for line in proc.stdout:
            tail.append(line)
            log.info("  | %s", line.rstrip())

    reader = threading.Thread(target=show, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise PackError(f"the packed script ran over {timeout} s and was stopped") from None
    finally:
        reader.join(timeout=10)
    return code, "".join(tail)


def verify(sub_dir: Path, run_dir: Path, timeout: int = 1800, tol: float = 1e-6) -> dict:
    """Check the submitted files against the run (`check_run`), run the packed train_gpt.py in an
    empty directory, check that run the same way; its metrics must match the run's."""
    before = check_run(run_dir, code=Path(sub_dir) / "train_gpt.py")
    if not before["pass"]:
        raise PackError(f"the submission does not check out: {before['reason']}")
    want = read_result(Path(run_dir) / "result.json")
    with tempfile.TemporaryDirectory(prefix="pgolf_verify_") as tmp:
        work = Path(tmp) / "empty"
        work.mkdir()
        shutil.copyfile(Path(sub_dir) / "train_gpt.py", work / "train_gpt.py")
        # the packed script prints plain lines: no relay tags, whatever this shell has set
        drop = ("PYTHONPATH", "PGOLF_LOG_RELAY", "PGOLF_LOG_DEBUG")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(PGOLF_JOB_DIR=str(work / "job"), TMPDIR=tmp)
        log.info(
            f"verify 1/3: running the packed train_gpt.py ({(work / 'train_gpt.py').stat().st_size:,} bytes) "
            f"with a fresh Python in the empty folder {work}, no PYTHONPATH; it trains and scores again:"
        )
        t0 = time.perf_counter()
        code, output = _run_packed(work, env, timeout)
        got_path = work / "job" / "result.json"
        if code != 0 or not got_path.is_file():
            raise PackError(f"the packed script failed (exit {code}):\n{output[-3000:]}")
        log.info(
            f"verify 2/3: the packed run finished in {time.perf_counter() - t0:.0f}s; checking that it "
            "shipped the script it ran from"
        )
        got = read_result(got_path)
        after = check_run(work / "job")
        # A packed run ships the file it ran from: byte for byte the submitted script.
        shipped = work / "job" / "artifact" / "train_gpt.py"
        same_script = shipped.is_file() and shipped.read_bytes() == (work / "train_gpt.py").read_bytes()
    if not after["pass"]:
        raise PackError(f"the packed script's own run does not check out: {after['reason']}")
    if not same_script:
        raise PackError("the packed run did not ship the script it ran from (artifact/train_gpt.py differs)")
    checks = {
        "val_bpb": (got.val_bpb, want.val_bpb),
        "steps": (got.steps, want.steps),
        "model_bytes": (got.bytes.model, want.bytes.model),
        "code_bytes": (got.bytes.code, (Path(sub_dir) / "train_gpt.py").stat().st_size),
    }
    log.info(
        f"verify 3/3: comparing val_bpb, steps, model and code bytes with {Path(run_dir) / 'result.json'}"
    )
    bad = {
        k: v
        for k, v in checks.items()
        if v[0] is None or v[1] is None or (abs(v[0] - v[1]) > tol if k == "val_bpb" else v[0] != v[1])
    }
    if bad:
        raise PackError(f"the packed script does not reproduce the run: {bad} (packed, original)")
    return {k: v[0] for k, v in checks.items()} | {"code_bytes_packed_run": got.bytes.code}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.pack", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument(
        "--out", type=Path, default=None, help="submission folder (default: <run_dir>/submission)"
    )
    ap.add_argument("--name", default="")
    ap.add_argument("--author", default="")
    ap.add_argument("--github-id", default="")
    ap.add_argument(
        "--verify", action="store_true", help="rerun the packed script from an empty dir and compare"
    )
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = pack(a.run_dir, a.out, a.name, a.author, a.github_id)
        print(
            f"packed {info['dir']}: code {info['code_bytes']:,} + model {info['model_bytes']:,} = "
            f"{info['total']:,} bytes (cap {info['cap']:,})"
        )
        if a.verify:
            v = verify(Path(info["dir"]), a.run_dir)
            print(
                f"verified: the packed script reproduces val_bpb {v['val_bpb']:.8f}, {v['steps']} steps, "
                f"model {v['model_bytes']:,} bytes"
            )
    except PackError as e:
        print(f"pgolf.pack: {e}", file=sys.stderr)
        return 1
    return 0
