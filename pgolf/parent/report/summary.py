"""Per-configuration statistics and the comparison against a baseline.

The challenge's rule: docs/techniques.md#record-significance
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgolf.parent.report import stats
from pgolf.parent.report.collect import Group, Job, collect, group_jobs, select_group

LN2 = math.log(2.0)


@dataclass
class Baseline:
    desc: str
    loss: list[float] | None  # per-seed val_loss in nats (one value for a published number)
    bpb: list[float] | None  # per-seed val_bpb
    config_hash: str | None = None


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "values": []}
    return {
        "mean": stats.mean(values),
        "std": stats.std(values) if len(values) >= 2 else None,  # one seed has no spread to report
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def _mean_of(jobs: list[Job], get) -> float | None:
    vals = [v for v in (get(j.result) for j in jobs) if isinstance(v, (int, float))]
    return stats.mean(vals) if vals else None


def _tokens_per_byte(jobs: list[Job]) -> float | None:
    """From the validation counts of the roundtrip eval; converts bpb <-> nats on this val set."""
    for j in jobs:
        rt = (j.result.metrics or {}).get("roundtrip") or {}
        if rt.get("tokens") and rt.get("bytes"):
            return rt["tokens"] / rt["bytes"]
    return None


def group_stats(g: Group) -> dict[str, Any]:
    ok = sorted(g.ok_jobs, key=lambda j: (j.seed is None, j.seed))
    counts = [j.result.bytes for j in ok]
    bytes_total = [c.total for c in counts if c is not None and c.total is not None]
    return {
        "config_hash": g.config_hash,
        "desc": g.desc,
        "label": g.label,
        "overrides": g.overrides,
        "n": len(ok),
        "n_failed": len(g.failed_jobs),
        "seeds": [j.seed for j in ok],
        "jobs": [j.name for j in g.jobs],
        "val_bpb": _spread([float(j.result.val_bpb) for j in ok]),
        "val_loss": _spread([float(j.result.val_loss) for j in ok]),
        "ms_per_step": _mean_of(ok, lambda r: r.ms_per_step),
        "steps": _mean_of(ok, lambda r: r.steps),
        "bytes_total_max": max(bytes_total) if bytes_total else None,
        "within_cap": all(c is not None and bool(c.within_cap) for c in counts) if bytes_total else None,
        "train_seconds": _mean_of(ok, lambda r: (r.timings or {}).get("train")),
        "eval_seconds": _mean_of(ok, lambda r: (r.timings or {}).get("eval")),
        "tokens_per_byte": _tokens_per_byte(ok),
    }


def compare(g: dict[str, Any], base: Baseline, alpha: float, margin: float) -> dict[str, Any]:
    """Candidate group vs baseline: deltas, Welch's test and the challenge's rule test, in nats.

    Rule (docs/techniques.md#record-significance): improve by at least `margin` nats at p < alpha,
    tested as a one-sided one-sample t-test of the candidate's per-seed losses against
    `baseline mean - margin`.
    """
    loss, bpb = g["val_loss"]["values"], g["val_bpb"]["values"]
    out: dict[str, Any] = {"baseline": base.desc, "n": len(loss)}
    if not loss:
        return {**out, "note": "no successful seeds"}
    tpb = g["tokens_per_byte"]
    base_loss, base_bpb = base.loss, base.bpb
    # A published number comes in one unit; convert it on this group's validation set.
    if base_loss is None and base_bpb is not None and tpb:
        base_loss = [b * LN2 / tpb for b in base_bpb]
    if base_bpb is None and base_loss is not None and tpb:
        base_bpb = [v * tpb / LN2 for v in base_loss]
    if base_loss is None:
        return {**out, "note": "cannot convert the baseline to nats (no token/byte counts)"}
    d_loss = stats.mean(loss) - stats.mean(base_loss)
    out["delta_loss"] = d_loss
    out["delta_bpb"] = stats.mean(bpb) - stats.mean(base_bpb) if base_bpb else None
    notes = []
    if len(loss) >= 2 and len(base_loss) >= 2:
        w = stats.welch_less(loss, base_loss)
        out["welch"] = {"t": w.t, "df": w.df, "p": w.p}
        if base_bpb and len(base_bpb) >= 2:
            wb = stats.welch_less(bpb, base_bpb)
            out["welch_bpb"] = {"t": wb.t, "df": wb.df, "p": wb.p}
    else:
        notes.append("Welch needs >= 2 seeds on each side")
    if len(loss) >= 2:
        r = stats.one_sample_less(loss, stats.mean(base_loss) - margin)
        out["rule"] = {"t": r.t, "df": r.df, "p": r.p}
        out["passes"] = bool(d_loss <= -margin and r.p < alpha)
        out["seeds_needed"] = stats.seeds_needed(d_loss + margin, stats.std(loss), alpha)
    else:
        out["passes"] = False
        notes.append("the rule test needs >= 2 seeds")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def parse_baseline(spec: str, groups: list[Group]) -> Baseline:
    """`<sweep_dir>[@selector]`, `<selector>` in this sweep, a number (val_bpb), `bpb=x` or `loss=x`."""
    text = spec.strip()
    for unit in ("bpb", "loss"):
        if text.startswith(unit + "="):
            value = float(text.split("=", 1)[1])
            return Baseline(
                f"{unit} {value}", [value] if unit == "loss" else None, [value] if unit == "bpb" else None
            )
    try:
        value = float(text)
        return Baseline(f"bpb {value}", None, [value])
    except ValueError:
        pass
    path_part, _, selector = text.partition("@")
    if Path(path_part).is_dir():
        others = group_jobs(collect([Path(path_part)]))
        pool = [g for g in others if g.ok_jobs]
        if selector:
            chosen = select_group(pool, selector)
        elif len(pool) == 1:
            chosen = pool[0]
        else:
            listing = "; ".join(f"{g.config_hash[:8]} ({g.desc})" for g in pool) or "none succeeded"
            raise ValueError(
                f"{path_part} holds {len(pool)} configurations; pick one with {path_part}@<hash>: {listing}"
            )
        desc = f"{path_part} {chosen.desc}"
    else:
        chosen = select_group([g for g in groups if g.ok_jobs], text)
        desc = chosen.desc
    ok = chosen.ok_jobs
    return Baseline(
        desc,
        [float(j.result.val_loss) for j in ok],
        [float(j.result.val_bpb) for j in ok],
        chosen.config_hash,
    )
