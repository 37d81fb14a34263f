"""Document-masked attention kernels on one GPU, forward + backward (bench code, not product code).

    python3 bench/doc_attention_speed.py [--shard fineweb_train_000000.bin] [--bos 1] [--reps 200]

Times pgolf's `DocMask` kernels (`hardware.doc_attention`) on the shapes the records train with,
(tokens, heads 8, KV heads 4, head dim 64), bf16, each attention call compiled with
`fullgraph=True` together with its mask construction, as the model's compiled forward runs it:

    packed    one row of 98,304 tokens (a micro-batch of the record recipe: `data.loader=doc_packing
              train.seq_len=98304 model.doc_max_len=2048`), flex with a block mask
    rows      48 rows of 2,048 tokens (pgolf's rows, `train.seq_len=2048 model.doc_mask=true`),
              flex, dense (SDPA with an explicit mask) and varlen where FA3 imports
    mask      the packed row's flex block mask alone: pgolf's tile-level build against torch's
              create_block_mask (every token pair)
    causal    the same 48 x 2,048 with no document mask (causal SDPA, cuDNN first then flash), the
              cost of the causal kernel the pre-varlen records used: the bar the masked kernels meet

The documents come from a shard's BOS positions (`--shard`, the first 98,304 tokens), else from a
seeded log-normal length draw with the sp8192 corpus's median (about 600 tokens). Prints ms per
forward+backward, and each masked kernel's largest output and gradient difference from `dense`
relative to its largest magnitude (rows only: dense at 98,304 would need a 9.7 G-element mask).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pgolf.data.shards import load_tokens
from pgolf.models import docmask

H, KV, D = 8, 4, 64
PACKED_T = 98_304
ROW_T = 2048


def token_ids(shard: str | None, bos: int, n: int) -> torch.Tensor:
    """n token ids in which only the BOS positions matter: a shard's own, or drawn lengths."""
    if shard:
        ids = np.asarray(load_tokens(shard, mmap=True)[:n], dtype=np.int64)
        if ids.size < n:
            raise SystemExit(f"{shard}: {ids.size} tokens, fewer than the {n} this benchmark needs")
        return torch.from_numpy(ids)
    rng = np.random.default_rng(0)
    ids = np.full(n, bos + 1, dtype=np.int64)
    pos = 0
    while pos < n:
        ids[pos] = bos
        pos += max(8, int(rng.lognormal(np.log(600), 1.0)))
    return torch.from_numpy(ids)


def fwd_bwd(attend, q, k, v, g):
    q.grad = k.grad = v.grad = None
    out = attend(q, k, v)
    out.backward(g)
    return out


def timed(fn, reps: int) -> float:
    import triton.testing

    fn()  # compile
    return triton.testing.do_bench(fn, warmup=25, rep=reps)


def masked(ids: torch.Tensor, backend: str, max_len: int, bos: int):
    def attend(q, k, v):
        return docmask.DocMask(ids, bos, max_len, backend=backend).attend(q, k, v)

    return torch.compile(attend, fullgraph=True, dynamic=False)


def compiles_for_scoring(ids: torch.Tensor, backend: str, bos: int, dev: torch.device) -> str:
    """Compile projection -> gain -> document-masked attention under inference mode; 'ok' and the
    largest difference from eager, or the exception's first line."""
    B, T = ids.shape
    x = torch.randn(B, T, 512, device=dev, dtype=torch.bfloat16)
    w = torch.randn((H + 2 * KV) * D, 512, device=dev, dtype=torch.bfloat16) / 512**0.5
    gain = torch.rand(H, device=dev) + 1.0

    def score(x, w, gain):
        q, k, v = F.linear(x, w).split([H * D, KV * D, KV * D], dim=-1)
        q = q.view(B, T, H, D) * gain.to(q.dtype)[None, None, :, None]
        k, v = k.reshape(B, T, KV, D) * 1.5, v.reshape(B, T, KV, D)
        return docmask.DocMask(ids, bos, 2048, backend=backend).attend(q, k, v)

    try:
        with torch.inference_mode():
            ref = score(x, w, gain) if backend == "dense" else None  # eager flex: T x T scores
            out = torch.compile(score, fullgraph=True, dynamic=False)(x, w, gain)
            if dev.type == "cuda":
                # a kernel's fault surfaces at the next CUDA call: wait here, so it is this check's
                # (the 2026-12-06 call printed "flex ok", then dense failed at its first randn with
                # an illegal memory access that may have been flex's)
                torch.cuda.synchronize(dev)
    except Exception as e:  # what failed, for the log; the benchmark goes on
        return "FAILED " + (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return "ok" if ref is None else f"ok, vs eager {rel_diff(out, ref):.1e}"


def _tile_mask(ids: torch.Tensor, bos: int):
    seg = docmask.segment_ids(ids, bos, ROW_T)
    return _tensors(docmask.doc_block_mask(seg, docmask.same_doc_causal(seg)))


def _pair_mask(ids: torch.Tensor, bos: int):
    from torch.nn.attention.flex_attention import create_block_mask

    seg = docmask.segment_ids(ids, bos, ROW_T)
    B, T = ids.shape
    return _tensors(create_block_mask(docmask.same_doc_causal(seg), B, None, T, T, device=ids.device))


def _tensors(bm) -> tuple[torch.Tensor, ...]:
    """Every tensor of a BlockMask (both directions), so the compiled build keeps all of its work."""
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    return tuple(getattr(bm, n) for n in names + tuple(n.replace("kv", "q", 1) for n in names))


def causal(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
    return y.transpose(1, 2)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard", help="a challenge shard whose BOS positions make the documents")
    ap.add_argument("--bos", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200, help="ms of timed repetitions per kernel")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("doc_attention_speed.py times GPU kernels; no CUDA device here")
    print(f"gpu {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    dev = torch.device("cuda")
    flat = token_ids(args.shard, args.bos, PACKED_T).to(dev)
    n_docs = int((flat == args.bos).sum())
    print(f"documents: {n_docs} BOS in {PACKED_T} tokens (mean {PACKED_T / max(n_docs, 1):.0f} tokens)")
    torch.manual_seed(0)

    def tensors(B: int, T: int):
        q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, T, KV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, T, KV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        return q, k, v, torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)

    have_varlen = docmask._try_varlen() is not None
    if have_varlen:
        docmask.select_doc_backend("varlen", "cuda")  # sets the FA3 function DocMask calls
    rows = flat.view(PACKED_T // ROW_T, ROW_T)
    q, k, v, g = tensors(*rows.shape)
    dense = masked(rows, "dense", 0, args.bos)
    ref_out = fwd_bwd(dense, q, k, v, g).detach()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    kernels = {"dense": dense, "flex": masked(rows, "flex", 0, args.bos)}
    if have_varlen:
        kernels["varlen"] = masked(rows, "varlen", 0, args.bos)
    kernels["causal (no doc mask)"] = causal
    for name, attend in kernels.items():
        ms = timed(lambda attend=attend: fwd_bwd(attend, q, k, v, g), args.reps)
        line = f"rows 48x2048  {name:<22} {ms:8.3f} ms"
        if name != "causal (no doc mask)":
            out = fwd_bwd(attend, q, k, v, g).detach()
            errs = [rel_diff(out, ref_out)] + [rel_diff(t.grad, r) for t, r in zip((q, k, v), ref_grads)]
            line += "   vs dense: " + " ".join(
                f"{n} {e:.1e}" for n, e in zip(("out", "dq", "dk", "dv"), errs)
            )
        print(line, flush=True)

    # Scoring compiles the forward alone, under inference mode, with q/k/v fresh from pointwise ops
    # (the model's prologue), not graph inputs. experiment=pr1775 failed there on an H100 in
    # Inductor's flex lowering (docs/benchmarks.md section 9d), so this checks each kernel in that
    # form and reports a failure instead of stopping.
    for name in ["flex", "dense"] + (["varlen"] if have_varlen else []):
        print(
            f"inference  rows 48x2048 {name:<8} {compiles_for_scoring(rows, name, args.bos, dev)}", flush=True
        )
    print(
        f"inference  packed 32x2048 flex     {compiles_for_scoring(flat[: 32 * ROW_T].view(1, -1), 'flex', args.bos, dev)}"
    )

    packed = flat.view(1, PACKED_T)
    # The packed row's block mask on its own: pgolf's tile-level build (`docmask.doc_block_mask`)
    # against torch's create_block_mask, which evaluates all 98,304^2 token pairs (the kernel that
    # took 9.2 ms a forward in #1775's profile, docs/benchmarks.md section 9j).
    for name, build in (("doc_block_mask", _tile_mask), ("create_block_mask", _pair_mask)):
        fn = torch.compile(lambda ids, build=build: build(ids, args.bos), fullgraph=True, dynamic=False)
        print(f"mask   1x98304 {name:<22} {timed(lambda fn=fn: fn(packed), args.reps):8.3f} ms", flush=True)
    q, k, v, g = tensors(1, PACKED_T)
    backends = ["flex"] + (["varlen"] if have_varlen else [])
    for name in backends:
        attend = masked(packed, name, ROW_T, args.bos)
        ms = timed(lambda attend=attend: fwd_bwd(attend, q, k, v, g), args.reps)
        print(f"packed 1x98304 {name:<22} {ms:8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
