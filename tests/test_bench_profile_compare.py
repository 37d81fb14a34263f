"""bench/profile_compare.py: two step profiles side by side, from their JSON files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from profile_compare import compare, load, rebuilt_kernels  # noqa: E402


def _profile(label: str, step_ms: float, groups: dict, top: list[tuple[str, float]]) -> dict:
    return {
        "label": label,
        "step_ms": step_ms,
        "groups_ms_per_step": groups,
        "top": [
            {"name": n, "group": "triton_fused", "ms_per_step": ms, "calls_per_step": 8} for n, ms in top
        ],
    }


REF = _profile("ref", 1000.0, {"gemm": 300.0, "attention": 400.0}, [("nvjet_gemm", 300.0)])
OURS = _profile(
    "pgolf",
    1050.0,
    {"gemm": 290.0, "attention": 410.0, "other": 5.0},
    [
        ("triton_poi_fused_add_arange_cos_mul_sin_slice_3", 20.0),  # a rebuilt table
        ("triton_red_fused_arange_bitwise_and_eq_sum_1", 70.0),  # the document mask: arange alone
        ("nvjet_sin_cos_named_library_kernel", 9.0),  # not Inductor's: its name says nothing
    ],
)


def test_the_ratio_the_group_differences_and_the_rebuilt_tables():
    text = compare(REF, OURS)
    assert "1.050x (+50.00 ms)" in text
    assert "| gemm | 300.000 | 290.000 | -10.000 |" in text
    assert "| other | 0.000 | 5.000 | +5.000 |" in text  # a group only one side has
    assert [k["name"] for k in rebuilt_kernels(OURS)] == ["triton_poi_fused_add_arange_cos_mul_sin_slice_3"]
    assert "pgolf: kernels that evaluate a cos or sin: 20.000 ms/step" in text
    assert "ref: kernels that evaluate a cos or sin: 0.000 ms/step" in text


def test_the_committed_1775_profiles_read_as_the_benchmark_says():
    logs = REPO / "docs" / "bench_logs" / "gpu_h100_1207e"
    ref, ours = load(logs / "profile_ref_pr1775.json"), load(logs / "profile_pgolf_pr1775.json")
    assert "1.031x" in compare(ref, ours)
    assert round(sum(k["ms_per_step"] for k in rebuilt_kernels(ours)), 1) == 31.4  # §9j


def test_a_file_that_is_not_a_profile_is_named_with_the_fix(tmp_path):
    bad = tmp_path / "profile_x.json"
    bad.write_text(json.dumps({"label": "x"}))
    with pytest.raises(
        SystemExit, match=r"profile_x.json: missing \['groups_ms_per_step', 'step_ms', 'top'\]"
    ):
        load(bad)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "profile_compare.py"), str(bad), str(tmp_path / "absent.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "profile_x.json: missing" in out.stderr
