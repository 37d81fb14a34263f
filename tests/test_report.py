"""The significance statistics (published figures) and `pgolf.report` on synthetic sweep folders."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.config import config_hash
from pgolf.parent.report import stats
from pgolf.parent.report.__main__ import main as report_main
from pgolf.parent.report.render import write_report

# Published per-seed figures: the 2026-03-18 LongContextSeq2048 record (one-sample, against baseline - 0.005)
# and the 2026-03-25 ValCalib record (Welch, per-seed values of both PRs).
LONGCTX = [1.20576485, 1.2061746, 1.20715923]
VALCALIB_NEW = [1.11508120, 1.11437394, 1.11475014]
VALCALIB_OLD = [1.11922988, 1.12002032, 1.11888882]


def test_one_sample_reproduces_the_published_figures():
    r = stats.one_sample_less(LONGCTX, 1.2193657)
    assert round(r.t, 2) == -31.42 and r.df == 2
    assert r.p == pytest.approx(0.000506, abs=5e-7)
    assert round(r.p, 5) == 0.00051


def test_welch_reproduces_the_published_figures():
    r = stats.welch_less(VALCALIB_NEW, VALCALIB_OLD)
    assert round(r.t, 2) == -11.83
    assert round(r.df, 2) == 3.31
    assert r.p == pytest.approx(0.000403, abs=5e-7)
    # The other direction is the complement.
    assert stats.welch_less(VALCALIB_OLD, VALCALIB_NEW).p == pytest.approx(1 - r.p, abs=1e-12)


@pytest.mark.parametrize("t", [-50.0, -6.0, -1.5, -0.2, 0.0, 0.7, 3.0, 25.0])
def test_t_cdf_matches_closed_forms(t):
    # df=1 is the Cauchy distribution, df=2 has an algebraic CDF: both exact, both independent of
    # the continued fraction.
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    assert stats.t_cdf(t, 7.5) + stats.t_cdf(-t, 7.5) == pytest.approx(1.0, abs=1e-13)


def test_t_quantiles_and_power_hint():
    # Critical values from scipy's t.ppf(0.99, df).
    assert stats.t_ppf(0.99, 2) == pytest.approx(6.9646, abs=1e-4)
    assert stats.t_ppf(0.99, 3) == pytest.approx(4.5407, abs=1e-4)
    assert stats.t_ppf(0.99, 5) == pytest.approx(3.3649, abs=1e-4)
    # 3 seeds need t > 6.96: a margin of 0.003 with std 0.0008 gives t = 6.5 at n=3, 7.5 at n=4.
    assert stats.seeds_needed(-0.003, 0.0008, 0.01) == 4
    assert stats.seeds_needed(0.001, 0.0008, 0.01) is None


def test_betainc_edges_and_symmetry():
    assert stats.betainc(2.0, 3.0, 0.0) == 0.0 and stats.betainc(2.0, 3.0, 1.0) == 1.0
    # I_x(a, b) = 1 - I_{1-x}(b, a); I_x(1, 1) = x; I_x(a, 1) = x^a.
    assert stats.betainc(2.5, 0.5, 0.3) == pytest.approx(1 - stats.betainc(0.5, 2.5, 0.7), abs=1e-14)
    assert stats.betainc(1.0, 1.0, 0.37) == pytest.approx(0.37, abs=1e-14)
    assert stats.betainc(3.0, 1.0, 0.6) == pytest.approx(0.6**3, abs=1e-14)
    with pytest.raises(ValueError):
        stats.betainc(1.0, 1.0, 1.5)


# ----------------------------------------------------------------------------------- report


def H(tag: str) -> str:
    """The seed-free hash of the synthetic configuration `tag`."""
    return config_hash({"model": {"tag": tag}, "seed": 0, "label": ""})


def make_job(
    root: Path,
    num: int,
    overrides: list[str],
    seed: int,
    tag: str,
    loss: float | None,
    status: str = "ok",
    error: str = "",
    write_result: bool = True,
) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    tokens, nbytes = 1000, 2400  # the bpb of a loss: loss / ln2 * tokens / bytes
    (job / "config.json").write_text(json.dumps({"model": {"tag": tag}, "seed": seed, "label": ""}))
    if not write_result:
        return job
    result: dict = {"status": status, "seed": seed, "config_hash": H(tag), "label": ""}
    if status == "ok":
        result.update(
            val_loss=loss,
            val_bpb=loss / math.log(2) * tokens / nbytes,
            steps=100,
            ms_per_step=50.0 + seed % 3,
            bytes={"total": 1_000_000 + seed, "within_cap": True},
            timings={"train": 5.0, "eval": 1.5},
            metrics={"roundtrip": {"val_loss": loss, "tokens": tokens, "bytes": nbytes}},
            train_losses=[[1, 6.0], [50, 4.0 + loss / 10], [100, 3.0 + loss / 10]],
        )
    else:
        result["error"] = error
    (job / "result.json").write_text(json.dumps(result))
    return job


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    ctrl = [2.10, 2.102, 2.098]
    cand = [2.090, 2.0905, 2.0895]
    n = 0
    for seed, loss in zip((1, 2, 3), ctrl):
        make_job(root, n, ["model.num_layers=2", "wandb.mode=disabled"], seed, "A", loss)
        n += 1
    for seed, loss in zip((1, 2, 3), cand):
        make_job(root, n, ["model.num_layers=3", "wandb.mode=disabled"], seed, "B", loss)
        n += 1
    make_job(root, n, ["model.num_layers=4"], 1, "C", None, "failed", "TrainingError: train loss is nan")
    make_job(root, n + 1, ["model.num_layers=3"], 4, "B", None, write_result=False)
    return root


def test_report_groups_seeds_and_lists_failures(sweep):
    s = write_report([sweep], plot=False)
    groups = {g["config_hash"]: g for g in s["groups"]}
    assert set(groups) >= {H("A"), H("B"), H("C")}
    a, b = groups[H("A")], groups[H("B")]
    assert a["n"] == 3 and a["seeds"] == [1, 2, 3] and a["desc"] == "model.num_layers=2"
    assert a["val_loss"]["mean"] == pytest.approx(2.1) and a["val_loss"]["std"] == pytest.approx(0.002)
    assert a["ms_per_step"] == pytest.approx(51.0) and a["eval_seconds"] == 1.5
    assert a["bytes_total_max"] == 1_000_003
    # The job killed before its verdict is counted against the configuration it belongs to.
    assert b["n"] == 3 and b["n_failed"] == 1
    assert groups[H("C")]["n"] == 0
    errors = {f["job"]: f for f in s["failed"]}
    assert "nan" in errors["6"]["error"] and errors["7"]["status"] == "missing"
    assert s["jobs"] == {"total": 8, "ok": 6, "failed": 2}
    md = (sweep / "summary.md").read_text()
    assert "model.num_layers=4" in md and "TrainingError: train loss is nan" in md and "## Failed jobs" in md
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["config_hash"] for r in rows][:2] == [H("A"), H("B")]
    assert float(rows[0]["val_loss_mean"]) == pytest.approx(2.1)
    assert json.loads((sweep / "summary.json").read_text())["groups"][1]["n_failed"] == 1


def test_report_against_a_baseline_group(sweep):
    s = write_report([sweep], baseline="model.num_layers=2", plot=False)
    b = next(g for g in s["groups"] if g["config_hash"] == H("B"))
    c = b["comparison"]
    ctrl, cand = [2.10, 2.102, 2.098], [2.090, 2.0905, 2.0895]
    assert c["delta_loss"] == pytest.approx(-0.01)
    w = stats.welch_less(cand, ctrl)
    assert c["welch"]["t"] == pytest.approx(w.t) and c["welch"]["p"] == pytest.approx(w.p)
    rule = stats.one_sample_less(cand, 2.1 - 0.005)
    assert c["rule"]["p"] == pytest.approx(rule.p)
    assert c["passes"] is (rule.p < 0.01)
    assert c["passes"] is True  # 0.01 nats better with a 0.0005 spread
    a = next(g for g in s["groups"] if g["config_hash"] == H("A"))
    assert a["comparison"]["note"] == "this is the baseline"
    md = (sweep / "summary.md").read_text()
    assert "Against the baseline: model.num_layers=2" in md and "**yes**" in md
    # A stricter margin than the improvement never passes.
    strict = write_report([sweep], baseline=H("A")[:5], min_delta_nats=0.02, plot=False)
    assert not next(g for g in strict["groups"] if g["config_hash"] == H("B"))["comparison"]["passes"]


def test_report_against_a_published_bpb_value(sweep):
    # bpb 2.1 nats on this val set -> the candidate's 0.01 nats improvement, converted back.
    base_bpb = 2.1 / math.log(2) * 1000 / 2400
    s = write_report([sweep], baseline=str(base_bpb), plot=False)
    c = next(g for g in s["groups"] if g["config_hash"] == H("B"))["comparison"]
    assert c["delta_loss"] == pytest.approx(-0.01)
    assert c["delta_bpb"] == pytest.approx(-0.01 / math.log(2) * 1000 / 2400)
    assert "welch" not in c and c["rule"]["df"] == 2
    loss_based = write_report([sweep], baseline="loss=2.1", plot=False)
    c2 = next(g for g in loss_based["groups"] if g["config_hash"] == H("B"))["comparison"]
    assert c2["rule"]["p"] == pytest.approx(c["rule"]["p"])


def test_report_against_another_sweep(sweep, tmp_path):
    other = tmp_path / "other"
    for seed, loss in zip((7, 8), (2.2, 2.21)):
        make_job(other, seed, ["model.num_layers=9"], seed, "D", loss)
    s = write_report([sweep], baseline=str(other), plot=False)
    c = next(g for g in s["groups"] if g["config_hash"] == H("A"))["comparison"]
    assert c["delta_loss"] == pytest.approx(2.1 - 2.205)
    # Several sweeps merge by config hash.
    merged = write_report([sweep, other], out_dir=tmp_path / "merged", plot=False)
    assert {g["config_hash"] for g in merged["groups"]} >= {H("A"), H("D")}
    assert (tmp_path / "merged" / "summary.md").is_file()


def test_report_cli(sweep, capsys):
    assert report_main([str(sweep), "--baseline", H("A"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| model.num_layers=3 |" in out and "Δ val_loss" in out
    # An ambiguous or unknown baseline names the choices.
    assert report_main([str(sweep), "--baseline", "model.num_layers=7", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "matches no configuration" in err and H("A")[:8] in err
    assert report_main([str(sweep / "nope")]) == 2


def test_report_plot_or_a_note(sweep, monkeypatch):
    try:
        import matplotlib  # noqa: F401

        have_mpl = True
    except ImportError:
        have_mpl = False
    if have_mpl:
        s = write_report([sweep])
        png = sweep / "loss_curves.png"
        assert s["plot"] == "loss_curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![train loss per configuration](loss_curves.png)" in (sweep / "summary.md").read_text()
    # Without matplotlib the report still completes and says why there is no picture.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    s = write_report([sweep])
    assert s["plot"] is None and "matplotlib is not installed" in (sweep / "summary.md").read_text()


def test_report_out_to_a_new_folder_with_the_plot(sweep, tmp_path):
    """--out may name a folder that does not exist yet, also when the plot is drawn."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "new" / "deeper"
    assert report_main([str(sweep), "--out", str(out), "--baseline", "model.num_layers=2"]) == 0
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "summary.md").is_file() and not (sweep / "summary.md").exists()


def test_a_corrupt_result_json_is_called_corrupt_and_named(sweep, capsys):
    bad = sweep / "0" / "result.json"
    bad.write_text('{"status": "ok", "val_bpb": 1.2')  # cut off mid-write
    (sweep / "1" / "result.json").write_text("[1, 2]")  # valid JSON, but not a result
    s = write_report([sweep], plot=False)
    errors = {f["job"]: f for f in s["failed"]}
    assert errors["0"]["status"] == "corrupt" and errors["1"]["status"] == "corrupt"
    assert str(bad) in errors["0"]["error"] and "JSONDecodeError" in errors["0"]["error"]
    assert "not an object" in errors["1"]["error"]
    assert "missing" not in errors["0"]["error"] and "no result.json" not in errors["0"]["error"]
    # The killed job (no result.json at all) is still told apart from the corrupt ones.
    assert errors["7"]["status"] == "missing"
    md = (sweep / "summary.md").read_text()
    assert f"{bad} is corrupt" in md


def test_one_seed_shows_no_fake_spread(tmp_path):
    root = tmp_path / "sweep"
    make_job(root, 0, ["model.num_layers=2"], 1, "A", 2.1)
    make_job(root, 1, ["model.num_layers=3"], 1, "B", 2.09)
    make_job(root, 2, ["model.num_layers=3"], 2, "B", 2.091)
    s = write_report([root], plot=False)
    one = next(g for g in s["groups"] if g["config_hash"] == H("A"))
    assert one["n"] == 1 and one["val_bpb"]["std"] is None and one["val_loss"]["std"] is None
    md = (root / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| model.num_layers=2 |"))
    assert "(n=1, no spread)" in row and "±" not in row
    two = next(line for line in md.splitlines() if line.startswith("| model.num_layers=3 |"))
    assert "±" in two and "no spread" not in two
    assert next(csv.DictReader((root / "summary.csv").open()))["val_bpb_std"] == ""


def test_plot_names_configs_by_overrides_and_marks_baseline_and_passes(sweep):
    pytest.importorskip("matplotlib")
    from pgolf.parent.report.plot import BASELINE_MARK, PASS_GID, PASS_MARK, build_figure
    from pgolf.parent.report.render import build_summary

    summary, groups = build_summary([sweep], baseline="model.num_layers=2")
    fig = build_figure(groups, summary)
    ax_loss, ax_bpb = fig.axes
    legend = [t.get_text() for t in ax_loss.get_legend().get_texts()]
    assert legend == [f"model.num_layers=2 ({BASELINE_MARK})", f"model.num_layers=3 ({PASS_MARK})"]
    ticks = [t.get_text() for t in ax_bpb.get_xticklabels()]
    assert ticks == ["model.num_layers=2", "model.num_layers=3"]
    assert not any(H("A")[:8] in t or H("B")[:8] in t for t in ticks + legend)
    # The baseline's mean val_bpb is a line on the val_bpb panel, named in its legend.
    base_bpb = 2.1 / math.log(2) * 1000 / 2400
    lines = [ln for ln in ax_bpb.get_lines() if ln.get_label().startswith(f"{BASELINE_MARK}: ")]
    assert len(lines) == 1 and lines[0].get_ydata()[0] == pytest.approx(base_bpb)
    # The passing configuration gets a star on its mean; no other does.
    stars = [c for c in ax_bpb.collections if c.get_gid() == PASS_GID]
    assert [c.get_offsets()[0][0] for c in stars] == [1.0]
    import matplotlib.pyplot as plt

    plt.close(fig)
    # A published number as the baseline: still a line, no configuration marked as the baseline.
    summary, groups = build_summary([sweep], baseline="loss=2.1")
    fig = build_figure(groups, summary)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert not any(BASELINE_MARK in t for t in legend)
    lines = [ln for ln in fig.axes[1].get_lines() if ln.get_label().startswith(f"{BASELINE_MARK}: ")]
    assert lines and lines[0].get_ydata()[0] == pytest.approx(base_bpb)
    plt.close(fig)
