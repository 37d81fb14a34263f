"""bench/summarize.py reads both record log dialects the same way pgolf's is read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "summarize", Path(__file__).parents[1] / "bench" / "summarize.py"
)
summarize = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(summarize)

# Lines as the 2026-04-09 record prints them (from docs/bench_logs/models_r0409_h100_same_init).
R0409_LOG = """\
50/150 train_loss: 4.2352 train_time: 0.6m tok/s: 1021930
100/150 train_loss: 3.4925 train_time: 1.6m tok/s: 816556
150/150 train_loss: 3.1745 train_time: 2.6m tok/s: 758489
150/150 val_loss: 3.1902 val_bpb: 1.7817
peak memory allocated: 40729 MiB reserved: 41084 MiB
ema:applying EMA weights
pre-quantization post-ema val_loss:7.45733175 val_bpb:4.16475971 eval_time:19013ms
Total submission size quantized+lzma: 14854327 bytes
quantized val_loss:7.47904860 val_bpb:4.17688811 eval_time:54472ms
"""


def test_r0409_log_reports_the_post_ema_validation_and_its_gptq_roundtrip():
    d = summarize.parse(R0409_LOG, batch_tokens=786432)
    assert d["loss"] == {50: 4.2352, 100: 3.4925, 150: 3.1745}
    # train time from tok/s: 150 steps * 786,432 tokens / 758,489 tok/s
    assert abs(d["time"][150] - 1000 * 150 * 786432 / 758489) < 1e-6
    assert d["pre_val_bpb"] == 4.16475971  # after EMA, like pgolf's, not the pre-EMA 1.7817
    assert (d["val_loss"], d["val_bpb"]) == (7.47904860, 4.17688811)
    assert d["bytes"] == 14854327 and d["peak_mib"] == 40729


def test_pgolf_log_without_ema_line_keeps_its_last_validation():
    text = "step:150/150 val_loss:7.4655 val_bpb:4.1693 train_time:149330ms\n"
    assert summarize.parse(text)["pre_val_bpb"] == 4.1693
