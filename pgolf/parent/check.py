"""`python -m pgolf.check <run_dir>`: re-verify a finished run against the challenge's rules.

Nothing is taken on trust from result.json that the files can prove: the shipped files are
re-hashed and their bytes counted on disk against the cap, the val split's token count is re-read
from the shard headers, and the tokenizer is re-hashed against the shards' manifest. The time
figures, the TTT mode and the score are re-judged by the same rules as the trainer's verdict
(`pgolf.rules`). A check whose files are not on this machine is reported as skipped, not passed.
`pgolf.pack` and `pgolf.pack --verify` run the same checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf.parent.result_file import read_result
from pgolf.results import read_json, sha256_file
from pgolf.rules import not_trained_here, val_split_of, verdict
from pgolf.run_result import RunResult

SHIPPED = ("artifact/train_gpt.py", "artifact/final_model.ptz")


def _files(run_dir: Path, result: RunResult, code: Path | None) -> dict:
    """Every shipped file re-hashed; `code` replaces the run's train_gpt.py (a submission's copy)."""
    recorded = result.files or {}
    out, sizes = {}, {}
    for rel in SHIPPED:
        path = code if (code is not None and rel.endswith("train_gpt.py")) else run_dir / rel
        rec = recorded.get(rel)
        if rec is None:
            out[rel] = {
                "held": False,
                "why": "result.json records no sha256 for it (a run from before hashes)",
            }
            continue
        if not path.is_file():
            out[rel] = {"held": False, "why": f"{path} is missing"}
            continue
        digest, size = sha256_file(path), path.stat().st_size
        sizes[rel] = size
        held = digest == rec["sha256"] and size == rec["bytes"]
        out[rel] = {"path": str(path), "bytes": size, "sha256": digest, "held": held}
        if not held:
            out[rel]["why"] = (
                f"{path} changed since the run wrote it (sha256 {digest[:12]}..., recorded {rec['sha256'][:12]}...)"
            )
    cap = read_json(run_dir / "config.json")["budget"]["artifact_bytes"]
    total = sum(sizes.values()) if len(sizes) == len(SHIPPED) else None
    out["artifact_bytes"] = {"limit": cap, "used": total, "held": total is not None and total <= cap}
    if total is None:
        out["artifact_bytes"]["why"] = "not every shipped file is there to count"
    return out


def _scored(rec: dict) -> dict:
    """The blob a re-score (score_artifact=) scored, re-hashed against what it recorded."""
    path = Path(rec["path"])
    if not path.is_file():
        return {"held": None, "why": f"{path} is not on this machine"}
    digest = sha256_file(path)
    out = {"path": str(path), "sha256": digest, "held": digest == rec["sha256"]}
    if not out["held"]:
        out["why"] = (
            f"{path} changed since it was scored (sha256 {digest[:12]}..., recorded {rec['sha256'][:12]}...)"
        )
    return out


def _val_split(result: RunResult, config: dict) -> dict:
    """The whole val split was scored: the split's size re-read from every shard the pattern matches."""
    val = result.val or {}
    folder = Path(val.get("dir", ""))
    pattern = config.get("data", {}).get("val_pattern", "fineweb_val_*.bin")
    files = sorted(folder.glob(pattern)) if val.get("dir") and folder.is_dir() else []
    if not files:
        return {"held": None, "why": f"the val shards ({folder / pattern}) are not on this machine"}
    from pgolf.data.shards import read_header

    total = sum(read_header(f) for f in files)
    out = val_split_of(result.to_json(), config, total)  # under its window rule (legacy re-scores the tail)
    out["files"] = len(files)
    if total != val.get("tokens_total"):
        out["held"] = False
        out["why"] = f"the run counted {val.get('tokens_total')} val tokens, the shards hold {total}"
    return out


def _tokenizer(result: RunResult) -> dict:
    val = result.val or {}
    tok, folder = Path(val.get("tokenizer", "")), Path(val.get("dir", ""))
    if not val.get("tokenizer") or not tok.is_file() or not folder.is_dir():
        return {"held": None, "why": "the tokenizer or the shard folder is not on this machine"}
    from pgolf.data.shards import MANIFEST, manifest_tokenizer_hashes

    digest, want = sha256_file(tok), manifest_tokenizer_hashes(folder)
    if not want:
        return {"held": None, "why": f"{folder / MANIFEST} records no tokenizer sha256"}
    held = digest in want and digest == val.get("tokenizer_sha256")
    return {"tokenizer": str(tok), "sha256": digest, "manifest": sorted(want), "held": held}


def check_run(run_dir: str | Path, code: Path | None = None) -> dict:
    """The verdict on a finished run: {pass, reason, checks}. `code`: check this train_gpt.py (a
    submission folder's) instead of the run's own."""
    run_dir = Path(run_dir)
    result, config = read_result(run_dir / "result.json"), read_json(run_dir / "config.json")
    rules = verdict(result.to_json(), config)
    if result.scored_artifact is not None:
        rules = not_trained_here(rules, result.scored_artifact["path"])
    rules = rules["checks"]
    checks = {"status": {"status": result.status, "held": result.status == "ok"}}
    if result.status != "ok":
        checks["status"]["why"] = f"the run did not finish: {result.error or ''}"
    if result.scored_artifact is None:
        checks |= _files(run_dir, result, code)
    else:  # a re-score ships nothing: its one file is the artifact it scored, still unchanged
        checks["scored_artifact"] = _scored(result.scored_artifact)
    for key in ("train_seconds", "eval_seconds", "ttt", "val_bpb", "window_rule", "trained_here"):
        if key in rules:
            checks[key] = rules[key]
    checks["val_split"] = _val_split(result, config)
    checks["tokenizer"] = _tokenizer(result)
    failed = [k for k, c in checks.items() if c["held"] is False]
    return {
        "pass": not failed,
        "reason": "; ".join(f"{k}: {checks[k].get('why', _figures(checks[k]))}" for k in failed)
        or "every check held",
        "skipped": [k for k, c in checks.items() if c["held"] is None],
        "checks": checks,
    }


def _figures(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("held", "note"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.check", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished job dir (outputs/runs/... with result.json)")
    a = ap.parse_args(argv)
    if not (a.run_dir / "result.json").is_file() or not (a.run_dir / "config.json").is_file():
        print(
            f"pgolf.check: {a.run_dir} has no result.json and config.json; pass a pgolf job dir",
            file=sys.stderr,
        )
        return 2
    v = check_run(a.run_dir)
    for key, c in v["checks"].items():
        state = {True: "ok  ", False: "FAIL", None: "skip"}[c["held"]]
        print(f"  {state} {key:<26} {c.get('why') or _figures(c)}")
    print(f"pgolf.check: {'PASS' if v['pass'] else 'FAIL'}: {v['reason']}")
    return 0 if v["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
