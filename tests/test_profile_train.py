"""bench/profile_train.py: a training-step profile table on CPU (the GPU command is in
bench/profile_train.sh), and the kernel grouping on names the H100 profiles show."""

from __future__ import annotations

import importlib.util
import json
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
