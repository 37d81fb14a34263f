"""Train-loss curves per configuration (PNG). matplotlib is optional: `pip install -e ".[analysis]"`.

Configurations are named by the overrides that tell them apart (`Group.desc`), the baseline is
drawn as a line, and a configuration that passes the challenge's significance rule is marked.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from pgolf.parent.report.collect import Group
from pgolf.results import write_text_atomic

PASS_MARK = "passes the rule"
BASELINE_MARK = "baseline"
PASS_GID = "passes"  # the star's artist id, so tests (and SVG readers) can find it


def _comparisons(summary: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    rows = (summary or {}).get("groups") or []
    return {r["config_hash"]: r.get("comparison") or {} for r in rows}


def _baseline_bpb(summary: dict[str, Any] | None) -> float | None:
    """The baseline's mean val_bpb; a published loss is converted on this sweep's validation set."""
    base = (summary or {}).get("baseline")
    if not base:
        return None
    if base.get("val_bpb"):
        return math.fsum(base["val_bpb"]) / len(base["val_bpb"])
    tpb = next((r["tokens_per_byte"] for r in summary["groups"] if r.get("tokens_per_byte")), None)
    if base.get("val_loss") and tpb:
        return math.fsum(base["val_loss"]) / len(base["val_loss"]) * tpb / math.log(2.0)
    return None


def _short(text: str, width: int = 70) -> str:
    # A lone configuration is described by all of its overrides; a legend that wide leaves no plot.
    return text if len(text) <= width else text[: width - 1] + "…"


def curve_label(g: Group, comparison: dict[str, Any]) -> str:
    """The legend entry of a configuration: what differs, and its verdict against the baseline."""
    if comparison.get("note") == "this is the baseline":
        return f"{_short(g.desc)} ({BASELINE_MARK})"
    if comparison.get("passes"):
        return f"{_short(g.desc)} ({PASS_MARK})"
    return _short(g.desc)


def build_figure(groups: list[Group], summary: dict[str, Any] | None = None) -> Any:
    """The figure, or None when no successful job logged train losses. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on pods and CI
    import matplotlib.pyplot as plt

    curves = [(g, [j for j in g.ok_jobs if j.result.train_losses]) for g in groups]
    curves = [(g, jobs) for g, jobs in curves if jobs]
    if not curves:
        return None
    verdicts = _comparisons(summary)
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (g, jobs) in enumerate(curves):
        color = colors[i % len(colors)]
        verdict = verdicts.get(g.config_hash, {})
        is_base = verdict.get("note") == "this is the baseline"
        for k, job in enumerate(jobs):
            steps, losses = zip(*job.result.train_losses)
            # One line per seed, thin, with the group named once: seeds read as a band.
            ax_loss.plot(
                steps,
                losses,
                color="black" if is_base else color,
                ls="--" if is_base else "-",
                lw=1.2,
                alpha=0.75,
                label=curve_label(g, verdict) if k == 0 else None,
            )
        bpbs = [j.result.val_bpb for j in jobs]
        ax_bpb.scatter([i] * len(bpbs), bpbs, color=color, s=28)
        mean = sum(bpbs) / len(bpbs)
        ax_bpb.hlines(mean, i - 0.25, i + 0.25, color=color, lw=2)
        if verdict.get("passes"):
            ax_bpb.scatter(
                [i], [mean], marker="*", s=220, color="gold", edgecolors="black", zorder=5, gid=PASS_GID
            )
            ax_bpb.annotate(PASS_MARK, (i, mean), textcoords="offset points", xytext=(8, -12), fontsize=7)
    base_bpb = _baseline_bpb(summary)
    if base_bpb is not None:
        desc = summary["baseline"]["desc"]
        ax_bpb.axhline(
            base_bpb,
            color="black",
            ls="--",
            lw=1,
            label=f"{BASELINE_MARK}: {_short(desc, 40)} ({base_bpb:.5f})",
        )
        ax_bpb.legend(fontsize=7, loc="best")
    ax_loss.set(
        xlabel="step", ylabel="train loss (nats)", title="train loss per configuration (one line per seed)"
    )
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, loc="upper right")
    ax_bpb.set(ylabel="val_bpb (artifact roundtrip)", title="val_bpb per seed (bar: mean; *: passes)")
    ticks = ["\n".join(textwrap.wrap(g.desc, 22, max_lines=3, placeholder=" …")) for g, _ in curves]
    ax_bpb.set_xticks(range(len(curves)), ticks, rotation=0, fontsize=7)
    ax_bpb.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_loss_curves(groups: list[Group], path: Path, summary: dict[str, Any] | None = None) -> str | None:
    """Write the plot; return None on success, or a note saying why there is no plot."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return 'plot skipped: matplotlib is not installed (pip install -e ".[analysis]")'
    fig = build_figure(groups, summary)
    if fig is None:
        return "plot skipped: no successful job logged train losses"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.render.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    write_text_atomic(path, tmp.read_bytes())
    tmp.unlink()
    return None
