"""Newton-Schulz one matrix at a time against batched, on the device: time per optimizer step and
how far the two forms' updates are apart (optimizer.ns_batch; docs/benchmarks.md §9f/§9g).

    python bench/ns_forms.py                      # PR #339's Muon matrices (11 layers, d 512, MLP 3x)
    python bench/ns_forms.py --experiment pr1532  # the 2026-04-09 stack's (MLP 4x)

The matrices are the experiment's own Muon parameters (model built on the meta device, shapes only),
filled with seeded Gaussian "gradients"; both forms run the experiment's own NS settings, compiled as
a run compiles them. Timing: CUDA events around `--reps` calls of every shape group after
`--warmup` calls, as one optimizer step runs them.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from device_probe import cuda_ms, muon_matrix_shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="pr339")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    # The full-size stacks are a GPU's work: a CPU smoke run keeps the matrices and their shape groups
    # but divides every dimension (the two forms' agreement does not depend on the size).
    ap.add_argument("--shrink", type=int, default=1, help="divide every matrix dimension by this")
    a = ap.parse_args()
    if a.shrink < 1:
        ap.error(f"--shrink {a.shrink}: give a whole number of 1 or more (1 keeps the experiment's sizes)")

    from pgolf.optim.muon import make_ns
    from pgolf.parent.compose import compose_job

    job = compose_job([f"experiment={a.experiment}"])
    shapes = {tuple(d // a.shrink for d in s): n for s, n in muon_matrix_shapes(job).items()}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    stacks = [torch.randn(n, *s, generator=g).to(dev) for s, n in shapes.items()]
    print(f"{a.experiment}: {sum(shapes.values())} matrices in {len(shapes)} shapes {dict(shapes)} on {dev}")

    forms = {}
    for batch in (True, False):
        cfg = dataclasses.replace(job.optimizer, ns_batch=batch)
        forms["batched" if batch else "per-matrix"] = make_ns(cfg, compile_ns=dev.type == "cuda")
    out = {name: [ns(G) for G in stacks] for name, ns in forms.items()}
    rel = max(
        ((x.float() - y.float()).norm() / y.float().norm()).item()
        for x, y in zip(out["batched"], out["per-matrix"])
    )
    equal = sum(torch.equal(x, y) for x, y in zip(out["batched"], out["per-matrix"]))
    print(
        f"batched vs per-matrix: {equal}/{len(stacks)} shape groups bit for bit, worst relative difference {rel:.2e}"
    )
    if dev.type != "cuda":
        return
    for name, ns in forms.items():
        ms = cuda_ms(lambda ns=ns: [ns(G) for G in stacks], a.warmup, a.reps)
        print(f"{name}: {ms:.2f} ms per optimizer step")


if __name__ == "__main__":
    main()
