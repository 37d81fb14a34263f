"""The challenge's rules as one verdict over a run's figures, written to result.json under `rules`.

Each check holds the figure, its limit and whether it held; `pass` is true only when every check
held, and `reason` names each one that did not. The trainer computes it at the end of a run; the
standalone checker (`pgolf.check`) recomputes it from result.json and adds what only the files can
prove (hashes, shard headers, the tokenizer).
"""

from __future__ import annotations

import math

import numpy as np

# TTT modes whose every update trains only on validation tokens that were already scored (the
# ScoredStream guard in pgolf.ttt.guard refuses anything else), so the score is legal.
LEGAL_TTT = {
    "none": "no test-time training",
    "score_first": "score-first",
    "lora": "score-first",
    "phased": "score-first",
}
# A final val_loss above this many times ln(vocab) is worse than guessing uniformly by far: a
# diverged run (lr 1e8 saturates the logits), never a result.
ABSURD_LOSS_FACTOR = 1.5


def val_check(val_loss: float | None, val_bpb: float | None, vocab_size: int) -> dict:
    limit = ABSURD_LOSS_FACTOR * math.log(vocab_size)
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (val_loss, val_bpb))
    held = ok and val_loss <= limit and val_bpb > 0
    return {"val_loss": val_loss, "val_bpb": val_bpb, "max_val_loss": limit, "held": held}


def val_split_check(
    scored: int | None,
    total: int | None,
    seq_len: int,
    rule: str | None = None,
    stride: int = 0,
    ttt: bool = False,
) -> dict:
    """The whole val split was scored: every target but a tail shorter than one sequence (the
    challenge truncates the stream to whole sequences), each exactly once. Under eval.window_rule=
    legacy (`rule`) the windows re-score tail targets on purpose: the count must then be exactly
    the legacy windows' (`stride`; `ttt`: score-first TTT's filter), which cover every target."""
    out = {"tokens_scored": scored, "tokens_in_split": total, "seq_len": seq_len}
    if rule != "legacy":
        out["held"] = scored is not None and total is not None and 0 <= total - 1 - scored < seq_len
        return out
    from pgolf.eval.windows import scored_ranges, window_starts

    n = (total - 1) // seq_len * seq_len if total and seq_len > 0 else 0
    want, covered = None, False
    if n > 0 and 1 <= stride <= seq_len:
        lo, hi = scored_ranges(window_starts(n, seq_len, stride, rule, ttt), n, seq_len, stride, rule)
        want = int((hi - lo).sum())
        reach = np.maximum.accumulate(hi)  # each window must start scoring where the earlier ones reach
        covered = bool(lo[0] == 0 and (lo[1:] <= reach[:-1]).all() and reach[-1] == n)
    out |= {
        "window_rule": rule,
        "stride": stride,
        "tokens_expected": want,
        "held": covered and scored == want,
    }
    return out


def val_split_of(result: dict, config: dict, total: int | None) -> dict:
    """val_split_check for the score behind val_bpb (its window rule, stride and TTT filter)."""
    final = result.get("metrics", {}).get("roundtrip", {}).get("tokens")
    rule, ttt = result.get("final_window_rule"), result.get("final_mode") == "score_first"
    stride = config.get("eval", {}).get("stride", 0)
    return val_split_check(final, total, result.get("val", {}).get("seq_len", 0), rule, stride, ttt)


def window_rule_check(result: dict) -> dict:
    """The score behind val_bpb used the challenge's window rule (or no windows). A legacy-rule run
    is a comparison with the pre-fix records, never a submission: the verdict fails it, the run
    itself still finishes (the trainer only records this check)."""
    rule = result.get("final_window_rule")
    if rule != "legacy":
        return {"rule": rule, "held": True}
    why = (
        "val_bpb was scored under eval.window_rule=legacy (tail targets counted more than once): a "
        "comparison with the pre-fix records, not the challenge's rule; rerun with eval.window_rule=exact"
    )
    return {"rule": rule, "held": False, "why": why}


def not_trained_here(rules: dict, scored_path: str) -> dict:
    """The verdict of a re-score (score_artifact=), which scores another run's artifact: its score
    is real, but the training, the calibration and the bytes a submission needs belong to that run,
    so it never passes. (Called only for a re-score, so a run's shipped code does not carry it.)"""
    why = f"a re-score of {scored_path} (score_artifact): pack the run that trained it"
    checks = {**rules["checks"], "trained_here": {"held": False, "scored_artifact": scored_path, "why": why}}
    failed = [k for k, c in checks.items() if not c["held"]]
    return {"pass": False, "reason": "; ".join(_why(k, checks[k]) for k in failed), "checks": checks}


def verdict(result: dict, config: dict) -> dict:
    """The rules checks of a finished run (result.json and the frozen config.json as dicts)."""
    b, ttt = config["budget"], config.get("ttt", {}).get("name", "none")
    sec = result.get("timings", {})
    train_used = result.get("train_ms", 0.0) / 1000.0 + result.get("calibration_seconds", 0.0)
    eval_used = sec.get("eval", 0.0) + sec.get("ttt", 0.0)
    size = result.get("bytes", {}).get("total")
    checks = {
        "train_seconds": {
            "limit": b["train_seconds"],
            "used": train_used,
            "held": train_used <= b["train_seconds"],
            "note": "training plus GPTQ calibration",
        },
        "eval_seconds": {
            "limit": b["eval_seconds"],
            "used": eval_used,
            "held": eval_used <= b["eval_seconds"],
            # The rules leave open whether compile warm-up counts; accepted records excluded it.
            "used_with_warmup": eval_used + sec.get("eval_warmup", 0.0),
        },
        "artifact_bytes": {
            "limit": b["artifact_bytes"],
            "used": size,
            "held": size is not None and size <= b["artifact_bytes"],
        },
        "ttt": {
            "mode": ttt,
            "held": ttt in LEGAL_TTT,
            "why": LEGAL_TTT.get(ttt, "not a known score-first mode"),
        },
        "val_bpb": val_check(result.get("val_loss"), result.get("val_bpb"), config["model"]["vocab_size"]),
        "val_split": val_split_of(result, config, result.get("val", {}).get("tokens_total")),
        "window_rule": window_rule_check(result),
    }
    failed = [k for k, c in checks.items() if not c["held"]]
    return {
        "pass": not failed,
        "reason": "; ".join(_why(k, checks[k]) for k in failed) or "every rule held",
        "checks": checks,
    }


def _why(key: str, c: dict) -> str:
    if key == "ttt":
        return f"ttt={c['mode']} is not a legal score-first mode"
    if key == "val_bpb":
        return f"val_loss {c['val_loss']} / val_bpb {c['val_bpb']} is not finite or above {c['max_val_loss']:.2f} nats (diverged)"
    if key == "val_split" and c.get("window_rule") == "legacy":
        return (
            f"scored {c['tokens_scored']} val targets, not the {c['tokens_expected']} that the legacy windows "
            f"score over the whole split of {c['tokens_in_split']} tokens"
        )
    if key == "val_split":
        return f"scored {c['tokens_scored']} of the val split's {c['tokens_in_split']} tokens, not the whole split"
    if key in ("window_rule", "trained_here"):
        return c["why"]
    return f"{key} {c['used']} over the limit {c['limit']}"
