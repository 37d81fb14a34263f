"""Train-loss curves per configuration (PNG). matplotlib is optional: `pip install -e ".[analysis]"`."""

from __future__ import annotations

from pathlib import Path

from pgolf.report.collect import Group
from pgolf.results import write_text_atomic


def plot_loss_curves(groups: list[Group], path: Path) -> str | None:
    """Write the plot; return None on success, or a note saying why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on pods and CI
        import matplotlib.pyplot as plt
    except ImportError:
        return 'plot skipped: matplotlib is not installed (pip install -e ".[analysis]")'
    curves = [(g, [j for j in g.ok_jobs if j.result.get("train_losses")]) for g in groups]
    curves = [(g, jobs) for g, jobs in curves if jobs]
    if not curves:
        return "plot skipped: no successful job logged train losses"

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (g, jobs) in enumerate(curves):
        color = colors[i % len(colors)]
        for k, job in enumerate(jobs):
            steps, losses = zip(*job.result["train_losses"])
            # One line per seed, thin, with the group named once: seeds read as a band.
            ax_loss.plot(steps, losses, color=color, lw=1.2, alpha=0.75, label=g.desc if k == 0 else None)
        bpbs = [j.result["val_bpb"] for j in jobs]
        ax_bpb.scatter([i] * len(bpbs), bpbs, color=color, s=28)
        ax_bpb.hlines(sum(bpbs) / len(bpbs), i - 0.25, i + 0.25, color=color, lw=2)
    ax_loss.set(
        xlabel="step", ylabel="train loss (nats)", title="train loss per configuration (one line per seed)"
    )
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, loc="upper right")
    ax_bpb.set(ylabel="val_bpb (artifact roundtrip)", title="val_bpb per seed (bar: mean)")
    ax_bpb.set_xticks(range(len(curves)), [g.config_hash[:8] for g, _ in curves], rotation=30, fontsize=8)
    ax_bpb.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.render.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    write_text_atomic(path, tmp.read_bytes())
    tmp.unlink()
    return None
