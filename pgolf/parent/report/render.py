"""Write summary.md / summary.csv / summary.json (atomically) and the loss plot for sweep folders."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from pgolf.parent.report.collect import collect, group_jobs
from pgolf.parent.report.plot import plot_loss_curves
from pgolf.parent.report.summary import Baseline, compare, group_stats, parse_baseline
from pgolf.results import write_text_atomic

PLOT_NAME = "loss_curves.png"


def build_summary(
    roots: list[Path],
    baseline: str | None = None,
    alpha: float = 0.01,
    min_delta_nats: float = 0.005,
) -> tuple[dict[str, Any], list]:
    jobs = collect(roots)
    groups = group_jobs(jobs)
    base: Baseline | None = parse_baseline(baseline, groups) if baseline else None
    rows = []
    for g in groups:
        s = group_stats(g)
        if base is not None and s["n"]:
            s["comparison"] = (
                {"baseline": base.desc, "note": "this is the baseline"}
                if base.config_hash == g.config_hash
                else compare(s, base, alpha, min_delta_nats)
            )
        rows.append(s)
    failed = [
        {
            "job": j.name,
            "path": str(j.path),
            "config": g.desc,
            "config_hash": g.config_hash,
            "seed": j.seed,
            "status": j.status,
            "error": j.error,
        }
        for g in groups
        for j in g.failed_jobs
    ]
    summary = {
        "sweep_dirs": [str(r) for r in roots],
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "alpha": alpha,
        "min_delta_nats": min_delta_nats,
        "jobs": {"total": len(jobs), "ok": sum(j.ok for j in jobs), "failed": len(failed)},
        "baseline": None if base is None else {"desc": base.desc, "val_loss": base.loss, "val_bpb": base.bpb},
        "groups": rows,
        "failed": failed,
    }
    return summary, groups


def _f(v: Any, digits: int = 5, signed: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return str(v)


def _mean_std(spread: dict[str, Any], n: int) -> str:
    """`mean ± std`; a single seed has no spread, and saying ± 0 would claim one."""
    if not n:
        return "-"
    if n == 1:
        return f"{_f(spread['mean'])} (n=1, no spread)"
    return f"{_f(spread['mean'])} ± {_f(spread['std'])}"


def _p(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(s: dict[str, Any], plot_note: str | None) -> str:
    j = s["jobs"]
    out = [
        f"# Sweep summary: {', '.join(s['sweep_dirs'])}",
        "",
        f"{j['total']} jobs: {j['ok']} ok, {j['failed']} failed or missing. Generated {s['generated']}.",
        "",
        "## Configurations",
        "",
        "| configuration | hash | n | val_bpb mean ± std | val_loss mean ± std | ms/step | steps | bytes (max) | train s | eval s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in s["groups"]:
        b, lo = g["val_bpb"], g["val_loss"]
        n = f"{g['n']}" + (f" (+{g['n_failed']} failed)" if g["n_failed"] else "")
        cap = "" if g["within_cap"] in (None, True) else " OVER CAP"
        out.append(
            f"| {_cell(g['desc'])} | `{g['config_hash'][:8]}` | {n} | {_mean_std(b, g['n'])} | "
            f"{_mean_std(lo, g['n'])} | {_f(g['ms_per_step'], 1)} | {_f(g['steps'], 0)} | "
            f"{'-' if g['bytes_total_max'] is None else format(g['bytes_total_max'], ',')}{cap} | "
            f"{_f(g['train_seconds'], 1)} | {_f(g['eval_seconds'], 1)} | {', '.join(map(str, g['seeds'])) or '-'} |"
        )
    if s["baseline"] is not None:
        out += [
            "",
            f"## Against the baseline: {_cell(s['baseline']['desc'])}",
            "",
            f"Rule: improve val_loss by at least {s['min_delta_nats']} nats at p < {s['alpha']} (one-sided "
            "one-sample t-test of the per-seed losses against baseline mean minus the margin). Welch: "
            "one-sided two-sample t-test on val_loss. Negative deltas are improvements.",
            "",
            "| configuration | n | Δ val_loss (nats) | Δ val_bpb | Welch t | df | p | rule t | rule p | passes | seeds needed |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in s["groups"]:
            c = g.get("comparison")
            if not c:
                continue
            w, r = c.get("welch") or {}, c.get("rule") or {}
            passes = "-" if "passes" not in c else ("**yes**" if c["passes"] else "no")
            needed = c.get("seeds_needed")
            note = f" ({_cell(c['note'])})" if c.get("note") else ""
            out.append(
                f"| {_cell(g['desc'])}{note} | {g['n']} | {_f(c.get('delta_loss'), 5, True)} | "
                f"{_f(c.get('delta_bpb'), 5, True)} | {_f(w.get('t'), 2)} | {_f(w.get('df'), 2)} | {_p(w.get('p'))} | "
                f"{_f(r.get('t'), 2)} | {_p(r.get('p'))} | {passes} | {'-' if needed is None else needed} |"
            )
    else:
        out += [
            "",
            "No baseline given: compare with `python -m pgolf.report <sweep_dir> --baseline <hash or overrides>`.",
        ]
    if s["failed"]:
        out += [
            "",
            "## Failed jobs",
            "",
            "| job | configuration | seed | status | error |",
            "|---|---|---|---|---|",
        ]
        for f in s["failed"]:
            err = f["error"].strip().splitlines()[0][:300] if f["error"].strip() else "-"
            out.append(f"| {f['job']} | {_cell(f['config'])} | {f['seed']} | {f['status']} | {_cell(err)} |")
    out += [
        "",
        f"![train loss per configuration]({PLOT_NAME})" if plot_note is None else f"_{plot_note}_",
        "",
    ]
    return "\n".join(out)


CSV_COLUMNS = [
    "config_hash", "desc", "n", "n_failed", "seeds", "val_bpb_mean", "val_bpb_std", "val_loss_mean",
    "val_loss_std", "ms_per_step", "steps", "bytes_total_max", "within_cap", "train_seconds",
    "eval_seconds", "delta_loss", "delta_bpb", "welch_t", "welch_df", "welch_p", "rule_t", "rule_p",
    "passes",
]  # fmt: skip


def csv_row(g: dict[str, Any]) -> dict[str, Any]:
    """One configuration as a flat row (summary.csv, the wandb table)."""
    c = g.get("comparison") or {}
    welch, rule = c.get("welch") or {}, c.get("rule") or {}
    return {
        **{k: g[k] for k in ("config_hash", "desc", "n", "n_failed", "ms_per_step", "steps")},
        **{k: g[k] for k in ("bytes_total_max", "within_cap", "train_seconds", "eval_seconds")},
        "seeds": " ".join(map(str, g["seeds"])),
        "val_bpb_mean": g["val_bpb"]["mean"],
        "val_bpb_std": g["val_bpb"]["std"],
        "val_loss_mean": g["val_loss"]["mean"],
        "val_loss_std": g["val_loss"]["std"],
        "delta_loss": c.get("delta_loss"),
        "delta_bpb": c.get("delta_bpb"),
        "welch_t": welch.get("t"),
        "welch_df": welch.get("df"),
        "welch_p": welch.get("p"),
        "rule_t": rule.get("t"),
        "rule_p": rule.get("p"),
        "passes": c.get("passes"),
    }


def to_csv(s: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for g in s["groups"]:
        w.writerow(csv_row(g))
    return buf.getvalue()


def write_report(
    roots: list[Path],
    out_dir: Path | None = None,
    baseline: str | None = None,
    alpha: float = 0.01,
    min_delta_nats: float = 0.005,
    plot: bool = True,
) -> dict[str, Any]:
    """Aggregate `roots` and write summary.{md,csv,json} (+ the PNG) into out_dir (default roots[0])."""
    roots = [Path(r).resolve() for r in roots]
    out = Path(out_dir or roots[0])
    out.mkdir(parents=True, exist_ok=True)  # --out may name a folder that does not exist yet
    summary, groups = build_summary(roots, baseline, alpha, min_delta_nats)
    plot_note = plot_loss_curves(groups, out / PLOT_NAME, summary) if plot else "plot skipped (--no-plot)"
    summary["plot"] = PLOT_NAME if plot_note is None else None
    summary["notes"] = [] if plot_note is None else [plot_note]
    md = to_markdown(summary, plot_note)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_text_atomic(out / "summary.csv", to_csv(summary))
    write_text_atomic(out / "summary.md", md)
    summary["markdown"] = md
    return summary
