"""The ATen ops of a seed script's training graphs against its experiment's, on the CPU (no GPU).

    python bench/graph_ops_cpu.py [pr1532] [--seq 256]

Both models (built as bench/seed_parity_cpu.py builds them) are traced by dynamo, fullgraph,
under bf16 autocast, and split by AOTAutograd into their forward and backward graphs; a backend
that only counts `call_function` nodes (no Inductor, so seconds, not minutes) prints each graph's
op count, for each graph variant (#1532's loop off and on), and the ops whose counts differ most.
It answers whether one side's graph does more work, before a GPU profile says where time goes.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from seed_parity_cpu import build_pgolf, build_script_sp8192, load_script, pgolf_job  # noqa: E402

counts: dict[str, collections.Counter] = {}


def backend_for(tag: str):
    from torch._functorch.aot_autograd import aot_module_simplified

    def counting(part: str):  # a compiler that records the graph's ops and runs it as traced
        def compiler(gm, ex):
            ops = (str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            counts[f"{tag}:{part}"] = collections.Counter(ops)
            return gm.forward

        return compiler

    def backend(gm, ex):
        return aot_module_simplified(gm, ex, fw_compiler=counting("fw"), bw_compiler=counting("bw"))

    return backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pr", nargs="?", default="pr1532", choices=["pr1532"], help="a looped sp8192 seed")
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    ref = build_script_sp8192(load_script(args.pr))["base_model"]
    pg, _ = build_pgolf(pgolf_job(args.pr))
    x = torch.randint(0, 8192, (1, args.seq))
    y = torch.randint(0, 8192, (1, args.seq))
    for loop in (False, True):
        run_variant(ref, pg, loop, x, y)
    report()


def run_variant(ref, pg, loop: bool, x, y) -> None:
    ref.looping_active = loop
    pg.set_graph_variant("loop_on" if loop else "loop_off")
    for tag, m in (("script", ref), ("pgolf", pg)):
        torch._dynamo.reset()
        backend = backend_for(f"{tag}:{'on' if loop else 'off'}")
        c = torch.compile(m, backend=backend, fullgraph=True, dynamic=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = c(x, y)
        loss.backward()


def report(top: int = 14) -> None:
    for phase in ("fw", "bw"):
        for loop in ("off", "on"):
            r, p = counts[f"script:{loop}:{phase}"], counts[f"pgolf:{loop}:{phase}"]
            keys = sorted(set(r) | set(p), key=lambda k: -abs(p.get(k, 0) - r.get(k, 0)))
            print(f"== {phase} loop {loop}: script {sum(r.values())} ops, pgolf {sum(p.values())}")
            for k in keys[:top]:
                if p.get(k, 0) != r.get(k, 0):
                    print(f"   {k:45s} script {r.get(k, 0):4d} pgolf {p.get(k, 0):4d}")


if __name__ == "__main__":
    main()
