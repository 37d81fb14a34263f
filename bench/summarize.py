"""Summarize a side-by-side run: parse both logs into one markdown table (ratios pgolf/reference).

    python bench/summarize.py OUT [--steps 100,200,300]

`--steps` are the logged steps whose train loss is reported; ms/step is the mean from the first
to the last of them (from each log's train_time).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def parse(text: str, batch_tokens: int = 786432) -> dict:
    out: dict = {"loss": {}, "time": {}}
    for m in re.finditer(r"step:(\d+)/\d+ train_loss:([\d.]+) train_time:(\d+)ms", text):
        out["loss"][int(m[1])] = float(m[2])
        out["time"][int(m[1])] = float(m[3])
    # The 2026-04-09 record logs "N/M train_loss: x train_time: 1.2m tok/s: t": its training time
    # in ms is N * batch_tokens / t * 1000 (the minutes are rounded to 0.1).
    for m in re.finditer(r"^(\d+)/\d+ train_loss: ([\d.]+) train_time: [\d.]+m tok/s: (\d+)", text, re.M):
        out["loss"][int(m[1])] = float(m[2])
        out["time"][int(m[1])] = 1000.0 * int(m[1]) * batch_tokens / max(int(m[3]), 1)
    m = re.search(r"^quantized val_loss:([\d.]+) val_bpb:([\d.]+)", text, re.M)
    if m:  # the 2026-04-09 record's GPTQ roundtrip
        out["val_loss"], out["val_bpb"] = float(m[1]), float(m[2])
    # Each script's own quantizer: int6+lzma roundtrip in the 2026-03-23 record (whose
    # final_int8_zlib_roundtrip_exact line repeats its sliding-window score), int8+zlib otherwise.
    m = (
        re.search(r"final_int6_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", text)
        or re.search(r"final_int8_zlib_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", text)
        or re.search(r"final_roundtrip val_loss:([\d.]+) val_bpb:([\d.]+)", text)
    )
    if m and "val_loss" not in out:
        out["val_loss"], out["val_bpb"] = float(m[1]), float(m[2])
    pre = re.findall(r"(?:step:|^)\d+/\d+ val_loss: ?([\d.]+) val_bpb: ?([\d.]+)", text, re.M)
    if pre:  # the last validation before quantization
        out["pre_val_bpb"] = float(pre[-1][1])
    # The 2026-04-09 record validates at its last step before applying EMA, then again after:
    # the post-EMA line is the one that compares with pgolf's (pgolf applies EMA before it validates).
    m = re.search(r"^pre-quantization post-ema val_loss:([\d.]+) val_bpb:([\d.]+)", text, re.M)
    if m:
        out["pre_val_bpb"] = float(m[2])
    m = re.search(r"Total submission size [\w+]+: (\d+) bytes", text) or re.search(
        r"= ([\d,]+) bytes \(cap", text
    )
    if m:
        out["bytes"] = int(m[1].replace(",", ""))
    m = re.search(r"peak memory allocated: (\d+) MiB", text) or re.search(r"peak memory (\d+) MiB", text)
    if m:
        out["peak_mib"] = int(m[1])
    return out


def ms_per_step(d: dict, a: int = 100, b: int = 300) -> float | None:
    t = d["time"]
    return (t[b] - t[a]) / (b - a) if a in t and b in t else None


def median_ms_per_step(d: dict, after: int) -> float | None:
    """Median over consecutive logged intervals that start at or after step `after` (compile done)."""
    steps = sorted(s for s in d["time"] if s >= after)
    per = [(d["time"][b] - d["time"][a]) / (b - a) for a, b in zip(steps, steps[1:])]
    return statistics.median(per) if per else None


def main(
    out_dir: str, steps: tuple[int, ...] = (100, 200, 300), batch_tokens: int = 786432, after: int = 0
) -> None:
    out = Path(out_dir)
    empty = {"loss": {}, "time": {}}
    ref = (
        parse((out / "reference.out").read_text(), batch_tokens)
        if (out / "reference.out").exists()
        else empty
    )
    pg = parse((out / "pgolf.out").read_text(), batch_tokens) if (out / "pgolf.out").exists() else empty
    res = json.loads((out / "pgolf_result.json").read_text()) if (out / "pgolf_result.json").exists() else {}
    a, b = steps[0], steps[-1]
    r_ms, p_ms = ms_per_step(ref, a, b), ms_per_step(pg, a, b)
    rows = [(f"ms/step (steps {a}-{b}, mean)", r_ms, p_ms)]
    if after:
        rows.append(
            (
                f"ms/step (median of log intervals from step {after})",
                median_ms_per_step(ref, after),
                median_ms_per_step(pg, after),
            )
        )
    for s in steps:
        rows.append((f"train loss @ {s}", ref["loss"].get(s), pg["loss"].get(s)))
    rows += [
        (f"pre-quant val_bpb (step {b}, after EMA if on)", ref.get("pre_val_bpb"), pg.get("pre_val_bpb")),
        ("roundtrip val_loss (each script's quantizer)", ref.get("val_loss"), pg.get("val_loss")),
        ("roundtrip val_bpb (each script's quantizer)", ref.get("val_bpb"), pg.get("val_bpb")),
        ("artifact bytes (model + code)", ref.get("bytes"), pg.get("bytes")),
        ("peak GPU memory (MiB)", ref.get("peak_mib"), pg.get("peak_mib")),
    ]
    print("| metric | reference | pgolf | pgolf / reference |\n|---|---:|---:|---:|")
    for name, a, b in rows:
        ratio = f"{b / a:.4f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""
        fa = "" if a is None else (f"{a:,}" if isinstance(a, int) else f"{a:.4f}")
        fb = "" if b is None else (f"{b:,}" if isinstance(b, int) else f"{b:.4f}")
        print(f"| {name} | {fa} | {fb} | {ratio} |")
    if res:
        print(
            f"\npgolf median ms/step (CUDA events, after compile): {res.get('ms_per_step', 0):.2f}; "
            f"timings: {json.dumps({k: round(v, 1) for k, v in res.get('timings', {}).items()})}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default="outputs/bench")
    ap.add_argument("--steps", default="100,200,300", help="comma-separated logged steps")
    ap.add_argument("--batch-tokens", type=int, default=786432, help="global batch (for tok/s-only logs)")
    ap.add_argument("--after", type=int, default=0, help="also report the median ms/step from this step on")
    args = ap.parse_args()
    main(args.out_dir, tuple(int(s) for s in args.steps.split(",")), args.batch_tokens, args.after)
