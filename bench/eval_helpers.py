"""Helpers of bench/eval.sh (bench code, not product code).

patch REF OUT            copy the 2026-03-23 record script with the R0401 sliding-window fix
dequant REF RUN_DIR OUT  its int6 artifact, dequantized with the script's own functions, saved
                         as a banked state dict under the record's names (what it evaluates)
summary OUT              the side-by-side table from reference.out and pgolf_result.json
lora_summary OUT TTT     pgolf's compiled vs eager LoRA/phased TTT pass (TTT=lora|phased eval.sh)
"""

from __future__ import annotations

import importlib.util
import io
import json
import lzma
import os
import re
import sys
from pathlib import Path

# The 2026-03-19 to 2026-03-31 records' window list kept short tail windows that re-score the last
# targets with less context (docs/techniques.md#sliding-window-eval); the 2026-04-01 record fixed it. pgolf's rule cannot produce the duplicates, so the
# reference is compared with the fix applied (PATCH=0 in eval.sh runs the original).
FIXES = [
    (
        "if min(ws + seq_len, total_tokens) - ws >= 1]",
        "if ws == 0 or ws + seq_len - stride < total_tokens]",
        1,
    ),
    (
        "if min(ws + seq_len, total_tokens) - ws >= stride or ws == 0]",
        "if ws == 0 or ws + seq_len - stride < total_tokens]",
        1,
    ),
    ("s = 0 if ws == 0 else max(wlen - stride, 0)", "s = 0 if ws == 0 else seq_len - stride", 3),
]


def patch(ref: str, out: str) -> None:
    src = Path(ref).read_text()
    for old, new, count in FIXES:
        if src.count(old) != count:
            sys.exit(f"patch: expected {count} x {old!r} in {ref}, found {src.count(old)}")
        src = src.replace(old, new)
    Path(out).write_text(src)
    print(f"patched window rule -> {out}")


def dequant(ref: str, run_dir: str, out: str) -> None:
    import torch

    spec = importlib.util.spec_from_file_location("r0323_ref", ref)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # definitions only; main() is behind __name__ == "__main__"
    n = int(os.environ.get("NUM_LAYERS", "11"))
    sd = torch.load(Path(run_dir) / "final_model.pt", map_location="cpu")
    unbanked = mod._unbank_state_dict(sd, n)
    blob = (Path(run_dir) / "final_model.int6.ptz").read_bytes()
    q = torch.load(io.BytesIO(lzma.decompress(blob)), map_location="cpu")
    state = mod._rebank_state_dict(mod.dequantize_mixed_int6(q["w"], q["m"], unbanked), n, sd)
    torch.save(state, out)
    print(f"dequantized {len(state)} tensors -> {out}")


def _ref_metrics(text: str) -> dict:
    out = {}
    for key, name in (
        ("final_int6_roundtrip", "nonoverlap"),
        ("final_int6_sliding_window", "sliding"),
        ("legal_ttt", "ttt"),
    ):
        exact = re.search(rf"^{key}_exact val_loss:(\S+) val_bpb:(\S+)", text, re.M)
        timed = re.search(rf"^{key} val_loss:\S+ val_bpb:\S+.*eval_time:(\d+)ms", text, re.M)
        if exact and timed:
            out[name] = {
                "val_loss": float(exact[1]),
                "val_bpb": float(exact[2]),
                "seconds": int(timed[1]) / 1000,
            }
    return out


def summary(out_dir: str) -> None:
    out = Path(out_dir)
    ref = _ref_metrics((out / "reference.out").read_text()) if (out / "reference.out").is_file() else {}
    res = json.loads((out / "pgolf_result.json").read_text()) if (out / "pgolf_result.json").is_file() else {}
    m = res.get("metrics", {})
    pg = {"nonoverlap": m.get("nonoverlap"), "sliding": m.get("sliding"), "ttt": m.get("score_first")}
    warm = res.get("timings", {}).get("eval_warmup")
    print(
        "| mode | ref val_bpb | pgolf val_bpb | |delta| | ref s | pgolf s | pgolf tokens/s | ref s / pgolf s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in ("nonoverlap", "sliding", "ttt"):
        r, p = ref.get(mode), pg.get(mode)
        if not (r or p):
            continue
        rb, pb = (r or {}).get("val_bpb"), (p or {}).get("val_bpb")
        rs, ps = (r or {}).get("seconds"), (p or {}).get("seconds")
        d = f"{abs(rb - pb):.2e}" if rb is not None and pb is not None else "-"
        ratio = f"{rs / ps:.2f}x" if rs and ps else "-"
        tps = f"{p['tokens_per_s']:,.0f}" if p else "-"
        print(
            f"| {mode} | {rb if rb is not None else '-'} | {pb if pb is not None else '-'} | {d} | {rs or '-'} | "
            f"{f'{ps:.2f}' if ps else '-'} | {tps} | {ratio} |"
        )
    if warm is not None:
        print(
            f"\npgolf eval warm-up (compile of the sliding + TTT graphs on random tokens, not in the times above): {warm:.1f}s"
        )
    print("(the reference's sliding time includes its torch.compile; its TTT runs eagerly)")
    for mode, tol, speed in (("sliding", 1e-4, ("ref/pgolf >=", 3.0)), ("ttt", 1e-3, ("pgolf/ref <=", 0.7))):
        r, p = ref.get(mode), pg.get(mode)
        if r and p:
            ok_bpb = abs(r["val_bpb"] - p["val_bpb"]) <= tol
            ratio = r["seconds"] / p["seconds"] if speed[0].startswith("ref") else p["seconds"] / r["seconds"]
            ok_t = ratio >= speed[1] if speed[0].startswith("ref") else ratio <= speed[1]
            print(
                f"target {mode}: |delta bpb| <= {tol:g}: {'PASS' if ok_bpb else 'FAIL'}; "
                f"time {speed[0]} {speed[1]}: {ratio:.2f} {'PASS' if ok_t else 'FAIL'}"
            )


def lora_summary(out_dir: str, ttt: str) -> None:
    """One row per pgolf_lora_<compile|eager>_result.json: the TTT mode's bpb, time and warm-up."""
    rows = {}
    for run in ("compile", "eager"):
        path = Path(out_dir) / f"pgolf_lora_{run}_result.json"
        if path.is_file():
            res = json.loads(path.read_text())
            rows[run] = (res.get("metrics", {}).get(ttt), res.get("timings", {}).get("eval_warmup"))
    print(f"| {ttt} pass | val_bpb | ttt s | tokens/s | eval_warmup s |")
    print("|---|---:|---:|---:|---:|")
    for run, (m, warm) in rows.items():
        if m:
            print(
                f"| {run} | {m['val_bpb']:.6f} | {m['seconds']:.1f} | {m['tokens_per_s']:,.0f} | {warm or 0:.1f} |"
            )
        else:
            print(f"| {run} | (no metrics.{ttt}: see pgolf_lora_{run}.out) | | | |")
    (c, _), (e, _) = rows.get("compile", (None, None)), rows.get("eager", (None, None))
    if c and e:
        print(
            f"\ncompiled/eager time: {c['seconds'] / e['seconds']:.2f}; "
            f"|delta bpb|: {abs(c['val_bpb'] - e['val_bpb']):.2e} (bf16; padding changes no score)"
        )


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"patch": patch, "dequant": dequant, "summary": summary, "lora_summary": lora_summary}[cmd](*args)
