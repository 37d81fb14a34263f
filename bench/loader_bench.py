"""Loader benchmark on one GPU: ms/step of the baseline model at the record batch with each loader,
prefetch off and on, against synthetic on-device tokens; plus each sampler's host throughput.

One process builds the model once (one compile), then swaps `trainer.loader` between variants and
times real training steps (`Trainer._train_step`, the code the trainer runs). The step time is
wall clock over `--steps` steps with the device synchronized at both ends, so any time the GPU
waits for the host shows up. Synthetic runs first and last, to expose drift.

    python bench/loader_bench.py --data DIR --tokenizer TOK [--steps 60] [--prefetch 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GRAD_ACCUM = 8  # train.grad_accum_base on one GPU


def split_train(src: Path, parts: int) -> Path:
    """A copy of `src` whose train tokens are cut into `parts` shards (val shards linked), so the
    multi-shard loaders mix shards as they would on the real export. Reused when present."""
    from pgolf.data.shards import load_tokens, write_shard

    dst = src.with_name(f"{src.name}_split{parts}")
    if (dst / "DONE").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate([load_tokens(f) for f in sorted(src.glob("fineweb_train_*.bin"))])
    for i, chunk in enumerate(np.array_split(tokens, parts)):
        write_shard(dst / f"fineweb_train_{i:06d}.bin", chunk)
    for f in sorted(src.glob("fineweb_val_*.bin")):
        link = dst / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    (dst / "DONE").write_text("ok")
    return dst


def compose(data: Path, tokenizer: Path, args: argparse.Namespace) -> dict:
    from pgolf.parent.compose import compose_dict

    overrides = [
        "experiment=none",
        "data=shards",
        f"data.path={data}",
        f"data.tokenizer_path={tokenizer}",
        f"data.vocab_size={args.vocab_size}",
        f"model={args.model}",
        f"hardware={args.hardware}",
        "budget.mode=steps",
        "train.iterations=100000",  # only bounds the LR schedule; the bench runs its own steps
        f"train.seq_len={args.seq_len}",
        f"train.batch_tokens={args.batch_tokens}",
        "train.prime_steps=0",
    ]
    return compose_dict(overrides)


def host_throughput(data_cfg, files: list[Path], batches: int, batch_tokens: int, seq_len: int) -> float:
    """Tokens/s one rank's sampler assembles into a host buffer (no device, no thread)."""
    import torch

    from pgolf.data.loader import build_loader

    local = batch_tokens // GRAD_ACCUM
    loader = build_loader(data_cfg, files, seed=1337, rank=0, world_size=1, device=torch.device("cpu"))
    sampler = loader.sampler
    buf = np.empty(sampler.shape(local, seq_len), dtype=np.uint16)
    for _ in range(3):
        sampler.fill(buf, local, seq_len)
    t0 = time.perf_counter()
    for _ in range(batches):
        sampler.fill(buf, local, seq_len)
    dt = time.perf_counter() - t0
    loader.close()
    return batches * local / dt


class ResidentLoader:
    """Real training tokens already resident on the device, cycled: the step time a loader would
    reach with zero host and copy cost. A fairer floor than uniform random ids, which make the
    embedding-gradient scatter cheaper than real text (no repeated ids contending for a row)."""

    def __init__(self, source, batch_tokens: int, seq_len: int, micro_batches: int = 64):
        self.batches = [
            tuple(t.clone() for t in source.next_batch(batch_tokens, seq_len, GRAD_ACCUM))
            for _ in range(micro_batches)
        ]
        source.close()
        self.i = 0

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum: int):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def close(self) -> None:
        self.batches = []


def time_steps(trainer, n: int, first_step: int) -> float:
    """Mean wall-clock ms per optimizer step over n steps, device synchronized at both ends."""
    trainer.rt.sync()
    t0 = time.perf_counter()
    for i in range(n):
        trainer._train_step(first_step + i, 0.0, None)
    trainer.rt.sync()
    return 1000.0 * (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warm", type=int, default=4, help="untimed steps after each loader switch")
    ap.add_argument("--compile-warm", type=int, default=12, help="untimed steps before the first variant")
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument(
        "--split-train", type=int, default=8, help="cut the train tokens into N shards (0: as is)"
    )
    ap.add_argument("--host-batches", type=int, default=100)
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench/loaders")
    # The record batch on one GPU by default; the rest exists for a CPU smoke run of this script.
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-tokens", type=int, default=786_432)
    ap.add_argument("--model", default="baseline")
    ap.add_argument("--hardware", default="gpu")
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args()

    import torch

    from pgolf.config import job_config_from_dict
    from pgolf.data.loader import build_loader
    from pgolf.trainer import Trainer

    data = split_train(args.data, args.split_train) if args.split_train else args.data
    files = sorted(data.glob("fineweb_train_*.bin"))
    job = job_config_from_dict(compose(data, args.tokenizer, args))
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"data: {data} ({len(files)} train shards); device: {device_name}", flush=True)

    loaders = ("sequential", "coprime", "shuffled")
    host = {}
    for name in loaders:
        cfg = dataclasses.replace(job.data, loader=name, prefetch=0)
        host[name] = host_throughput(cfg, files, args.host_batches, args.batch_tokens, args.seq_len)
        print(f"host {name}: {host[name] / 1e6:.1f} M tokens/s", flush=True)

    (args.out / "job").mkdir(exist_ok=True)
    trainer = Trainer(job, args.out / "job")
    trainer.build()
    # Resident real tokens open the run and follow every loader pair, so drift over the run shows
    # up between the resident rows and each loader is compared with its nearest floor.
    variants = [("resident", 0), ("synthetic", 0)]
    for n in loaders:
        variants += [(n, 0), (n, args.prefetch), ("resident", 0)]
    variants += [("synthetic", 0)]
    rows, step = [], 0
    for i, (name, prefetch) in enumerate(variants):
        trainer.loader.close()
        if name == "resident":
            src = build_loader(
                dataclasses.replace(job.data, loader="sequential", prefetch=0),
                files,
                seed=job.seed,
                rank=0,
                world_size=1,
                device=trainer.rt.device,
            )
            trainer.loader = ResidentLoader(src, args.batch_tokens, args.seq_len)
        else:
            cfg = dataclasses.replace(job.data, loader=name, prefetch=prefetch)
            trainer.loader = build_loader(
                cfg, files, seed=job.seed, rank=0, world_size=1, device=trainer.rt.device
            )
        warm = args.compile_warm if i == 0 else args.warm
        time_steps(trainer, warm, step)  # compile (first) or switch-over steps, untimed
        step += warm
        ms = time_steps(trainer, args.steps, step)
        step += args.steps
        rows.append({"loader": name, "prefetch": prefetch, "ms_per_step": ms})
        print(f"{name} prefetch={prefetch}: {ms:.2f} ms/step", flush=True)
    trainer.loader.close()

    synthetic = [r["ms_per_step"] for r in rows if r["loader"] == "synthetic"]
    resident = [r["ms_per_step"] for r in rows if r["loader"] == "resident"]
    floor = sum(resident) / len(resident)
    # Each loader row against the mean of the resident rows just before and after its pair.
    res_idx = [i for i, r in enumerate(rows) if r["loader"] == "resident"]
    for i, r in enumerate(rows):
        before = [rows[j]["ms_per_step"] for j in res_idx if j < i][-1:]
        after = [rows[j]["ms_per_step"] for j in res_idx if j > i][:1]
        near = before + after
        r["vs_nearest_resident"] = r["ms_per_step"] / (sum(near) / len(near)) - 1 if near else 0.0
    result = {
        "gpu": device_name,
        "torch": torch.__version__,
        "batch_tokens": args.batch_tokens,
        "seq_len": args.seq_len,
        "grad_accum": GRAD_ACCUM,
        "steps": args.steps,
        "train_shards": len(files),
        "synthetic_ms": synthetic,
        "resident_ms": resident,
        "rows": rows,
        "host_tokens_per_s": host,
    }
    (args.out / "loaders.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"model={args.model}, {args.batch_tokens:,} tokens/step (seq {args.seq_len}, grad accum {GRAD_ACCUM}), "
        f"{args.steps} timed steps per row, {result['gpu']}; resident real-token floor {floor:.2f} ms/step "
        f"(rows {', '.join(f'{x:.2f}' for x in resident)}); synthetic random ids "
        f"{', '.join(f'{x:.2f}' for x in synthetic)}.",
        "",
        "| loader | prefetch | ms/step | vs resident floor (mean) | vs nearest resident rows | host assembly (M tokens/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tput = host.get(r["loader"])
        host_col = f"{tput / 1e6:.1f}" if tput else "n/a (no host work)"
        lines.append(
            f"| {r['loader']} | {r['prefetch']} | {r['ms_per_step']:.2f} | "
            f"{r['ms_per_step'] / floor - 1:+.2%} | {r['vs_nearest_resident']:+.2%} | {host_col} |"
        )
    table = "\n".join(lines)
    (args.out / "loaders.md").write_text(table + "\n")
    print("\n" + table)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
