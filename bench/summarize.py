"""Summarize a side-by-side run: parse both logs into one markdown table (ratios pgolf/reference)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def parse(text: str) -> dict:
    out: dict = {"loss": {}, "time": {}}
    for m in re.finditer(r"step:(\d+)/\d+ train_loss:([\d.]+) train_time:(\d+)ms", text):
        out["loss"][int(m[1])] = float(m[2])
        out["time"][int(m[1])] = float(m[3])
    m = re.search(r"final_int8_zlib_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", text) or re.search(
        r"final_roundtrip val_loss:([\d.]+) val_bpb:([\d.]+)", text
    )
    if m:
        out["val_loss"], out["val_bpb"] = float(m[1]), float(m[2])
    m = re.search(r"Total submission size int8\+zlib: (\d+) bytes", text) or re.search(
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


def main(out_dir: str) -> None:
    out = Path(out_dir)
    ref = (
        parse((out / "reference.out").read_text())
        if (out / "reference.out").exists()
        else {"loss": {}, "time": {}}
    )
    pg = parse((out / "pgolf.out").read_text()) if (out / "pgolf.out").exists() else {"loss": {}, "time": {}}
    res = json.loads((out / "pgolf_result.json").read_text()) if (out / "pgolf_result.json").exists() else {}
    r_ms, p_ms = ms_per_step(ref), ms_per_step(pg)
    rows = [("ms/step (steps 100-300, mean)", r_ms, p_ms)]
    for s in (100, 200, 300):
        rows.append((f"train loss @ {s}", ref["loss"].get(s), pg["loss"].get(s)))
    rows += [
        ("int8+zlib roundtrip val_loss", ref.get("val_loss"), pg.get("val_loss")),
        ("int8+zlib roundtrip val_bpb", ref.get("val_bpb"), pg.get("val_bpb")),
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
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/bench")
