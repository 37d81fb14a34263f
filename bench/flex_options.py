"""flex_attention's kernel options at #1775's packed shape, forward + backward (bench code, not product code).

    python3 bench/flex_options.py [--shard fineweb_train_000000.bin] [--bos 1] [--reps 200] [--sets JSON]

Flex attention was 31% of #1775's looped training step on an H100 (docs/benchmarks.md §9j), on the
configuration Inductor picks by default for bf16 at head dim 64 (no autotuning unless the whole
compile runs max-autotune). This times the document-masked call of one packed micro-batch (one row
of 98,304 tokens, 8 query / 4 KV heads of 64, documents capped at 2,048 tokens as `model.doc_max_len`
does) under each set of `kernel_options` (torch.nn.attention.flex_attention.FlexKernelOptions:
`fwd_BLOCK_M`, `fwd_BLOCK_N`, `fwd_num_warps`, `fwd_num_stages`, `bwd_BLOCK_M1` .. `bwd_BLOCK_N2`,
`bwd_num_warps`, `bwd_num_stages`, `USE_TMA`, ...), the block mask built once outside the timed call,
and prints ms per forward + backward and each set's largest output and gradient difference from the
first set that ran (the default, unless it failed), relative to that set's largest magnitude. A set that fails to compile or run prints
its error and the sweep goes on.

Not every option is exact for this mask: `ROWS_GUARANTEED_SAFE` assumes every key tile a query row
visits holds a key it may see, and the first tile of a document-masked row may hold none (the
kernel would then compute exp2(-inf - -inf)), so it is not in the default list.
"""

from __future__ import annotations

import argparse
import json

import torch
from doc_attention_speed import KV, PACKED_T, ROW_T, D, H, rel_diff, timed, token_ids  # bench/ is on sys.path
from torch.nn.attention.flex_attention import flex_attention

from pgolf.models import docmask

# The default first (what pgolf runs today), then the forward configurations Inductor's autotuner
# would try on CUDA, each with the default backward, then backward block shapes, then TMA loads.
DEFAULT_SETS: list[dict] = [
    {},
    *[
        {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_stages": s, "fwd_num_warps": w}
        for m, n, s, w in [(128, 64, 3, 4), (128, 128, 2, 8), (64, 128, 3, 4), (64, 64, 3, 4)]
    ],
    *[
        {
            "bwd_BLOCK_M1": m,
            "bwd_BLOCK_N1": n,
            "bwd_BLOCK_M2": n,
            "bwd_BLOCK_N2": m,
            "bwd_num_stages": s,
            "bwd_num_warps": w,
        }
        for m, n, s, w in [(32, 64, 3, 4), (64, 64, 3, 4), (64, 128, 3, 8), (32, 128, 3, 4)]
    ],
    {"USE_TMA": True},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard", help="a challenge shard whose BOS positions make the documents")
    ap.add_argument("--bos", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200, help="ms of timed repetitions per set")
    ap.add_argument("--sets", help="a JSON list of kernel_options dicts (default: the list in this file)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("flex_options.py times GPU kernels; no CUDA device here")
    sets = json.loads(args.sets) if args.sets else DEFAULT_SETS
    print(f"gpu {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    dev = torch.device("cuda")
    ids = token_ids(args.shard, args.bos, PACKED_T).to(dev).view(1, PACKED_T)
    seg = docmask.segment_ids(ids, args.bos, ROW_T)
    block_mask = docmask.doc_block_mask(seg, docmask.same_doc_causal(seg))
    torch.manual_seed(0)
    q = torch.randn(1, H, PACKED_T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, KV, PACKED_T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, KV, PACKED_T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, H, PACKED_T, D, device=dev, dtype=torch.bfloat16)

    def run(attend):
        q.grad = k.grad = v.grad = None
        out = attend(q, k, v)
        out.backward(g)
        return [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]

    base = None
    for opts in sets:
        torch._dynamo.reset()

        def attend(q, k, v, opts=opts):
            return flex_attention(
                q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=opts or None
            )

        attend = torch.compile(attend, fullgraph=True, dynamic=False)
        label = json.dumps(opts, separators=(",", ":")) or "{}"
        try:
            got = run(attend)
            torch.cuda.synchronize()
            ms = timed(lambda attend=attend: run(attend), args.reps)
        except Exception as e:  # a configuration the kernel or the GPU cannot take: say so, go on
            print(
                f"{label}  FAILED {(str(e).strip().splitlines() or [type(e).__name__])[0][:160]}", flush=True
            )
            continue
        if base is None:
            base = got
        diffs = " ".join(f"{n} {rel_diff(a, b):.1e}" for n, a, b in zip(("out", "dq", "dk", "dv"), got, base))
        print(f"{label}  {ms:8.3f} ms   vs the first set that ran: {diffs}", flush=True)


if __name__ == "__main__":
    main()
