"""bench/profile_train.py: a training-step profile table on CPU (the GPU command is in
bench/profile_train.sh), and the kernel grouping on names the H100 profiles show."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, tiny_cpu_args

SPEC = importlib.util.spec_from_file_location("profile_train", REPO / "bench" / "profile_train.py")
profile_train = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(profile_train)


@pytest.mark.parametrize(
    "name, group",
    [
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_3", "triton_fused"),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "communication"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
        ("Memcpy HtoD (Pinned -> Device)", "other"),
        ("aten::addmm", "gemm"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ],
)
def test_kernel_names_fall_in_their_groups(name, group):
    assert profile_train.group_of(name) == group


def test_kernels_inside_the_optimizer_step_count_as_optimizer():
    # (total us, calls, us inside the optimizer step) over 2 steps
    table = {"nvjet_gemm_a": [3000.0, 10, 1000.0], "triton_poi_fused_x": [1000.0, 4, 0.0]}
    text, s = profile_train.render("t", "gpu", 4.0, 2, table, True, top=5)
    assert s["groups_ms_per_step"]["optimizer"] == pytest.approx(0.5)
    assert s["groups_ms_per_step"]["gemm"] == pytest.approx(1.0)
    assert s["groups_ms_per_step"]["triton_fused"] == pytest.approx(0.5)
    assert s["kernel_ms_per_step"] == pytest.approx(2.0)
    assert "| gemm | 1.000 | 50.0% | 25.0% |" in text


@pytest.mark.slow
def test_cpu_profile_writes_the_table(shard_dir, tokenizer_model, tmp_path):
    args = tiny_cpu_args(shard_dir, tokenizer_model, **{"train.prime_steps": "1", "label": "tiny"})
    cmd = [sys.executable, str(REPO / "bench" / "profile_train.py"), "--out", str(tmp_path), "--warm", "1"]
    proc = subprocess.run(
        [*cmd, "--steps", "2", "--top", "10", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "profile_tiny.txt").read_text()
    s = json.loads((tmp_path / "profile_tiny.json").read_text())
    assert s["steps"] == 2 and s["device"] == "cpu" and s["step_ms"] > 0
    assert s["optimizer_window"] is True and s["groups_ms_per_step"]["optimizer"] > 0
    assert s["groups_ms_per_step"]["gemm"] > 0 and len(s["top"]) == 10
    assert 0 < s["kernel_ms_per_step"] <= 1.05 * s["step_ms"]  # self times cannot exceed the step
    assert "| gemm |" in text and "top 10" in text


FAKE_RECORD = """
import torch
class Muon(torch.optim.SGD):
    pass
w = torch.nn.Parameter(torch.randn(64, 64))
b = torch.nn.Parameter(torch.zeros(64))
opts = [torch.optim.AdamW([b], lr=1e-3), Muon([w], lr=1e-2)]
if __name__ == "__main__":
    for step in range({steps}):
        loss = (torch.tanh(torch.randn(32, 64) @ w) + b).square().mean()
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        print("step", step + 1, flush=True)
"""


def _profile_ref(tmp_path, script_steps: int, skip: int, steps: int):
    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE_RECORD.format(steps=script_steps))
    cmd = [sys.executable, str(REPO / "bench" / "profile_ref.py"), "--out", str(tmp_path / "out")]
    cmd += ["--label", "ref_fake", "--skip", str(skip), "--steps", str(steps), str(script)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_profile_ref_profiles_the_scripts_own_steps_then_ends_it(tmp_path):
    """bench/profile_ref.py: the record script runs unmodified; steps skip+1..skip+steps of its
    Muon are profiled, the report is written, and the script's remaining steps never run."""
    out = _profile_ref(tmp_path, script_steps=20, skip=3, steps=4)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if re.fullmatch(r"step \d+", line)]
    assert lines[-1] == "step 6", lines  # the hook ends the process inside step 7's optimizer step
    summary = json.loads((tmp_path / "out" / "profile_ref_fake.json").read_text())
    assert summary["steps"] == 4 and summary["skip"] == 3 and summary["clock"] == "Muon"
    assert summary["optimizer_window"] and summary["groups_ms_per_step"]["optimizer"] > 0
    assert "# training-step profile: ref_fake" in (tmp_path / "out" / "profile_ref_fake.txt").read_text()


def test_profile_ref_says_when_the_script_ends_first(tmp_path):
    out = _profile_ref(tmp_path, script_steps=5, skip=3, steps=4)
    assert out.returncode == 1 and "ended after 5 steps" in out.stderr and "nothing profiled" in out.stderr
    assert not (tmp_path / "out" / "profile_ref_fake.json").exists()
