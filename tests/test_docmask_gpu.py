"""The document-masked attention kernels on a GPU (skipped without CUDA): flex against dense, forward
and backward, in bf16 under torch.compile as training runs them, on packed rows of the records'
shape (documents of varied length, rows that start mid-document, a length cap). Varlen (FA3) joins
the comparison where `flash_attn_interface` imports."""

from __future__ import annotations

import pytest
import torch

from pgolf.models import docmask
from pgolf.models.docmask import DocMask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BOS = 1
H, HKV, D = 8, 4, 64  # the records' 512-wide GQA attention
# bf16 noise: about 8 significant bits per value, so kernels that sum in a different order differ by
# a few 1e-3 in relative norm; a wrong mask (one key too many or too few) moves whole rows by O(1)
FWD_TOL, BWD_TOL = 1e-2, 2e-2


def assert_near(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    # relative to the reference's norm, or absolute where it is ~0 (a one-token document's dq is 0)
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1.0)).item()
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


@pytest.fixture(autouse=True)
def _default_backend():
    yield
    docmask._DOC_BACKEND = None


def packed_ids(B: int, T: int, seed: int) -> torch.Tensor:
    """Rows cut from a stream of documents of 1..3T/2 tokens, each starting with BOS: most rows
    start mid-document, some documents are longer than the cap, one is a single token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 8192, (B, T), generator=g)
    for b in range(B):
        t = int(torch.randint(1, T // 4, (1,), generator=g))
        while t < T:
            ids[b, t] = BOS
            t += int(torch.randint(1, 3 * T // 2, (1,), generator=g))
    ids[0, 7] = ids[0, 8] = BOS  # a one-token document
    return ids.cuda()


def qkv(B: int, T: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = ((B, T, H, D), (B, T, HKV, D), (B, T, HKV, D))
    return [torch.randn(s, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_() for s in shapes]


def run(
    backend: str,
    ids: torch.Tensor,
    max_len: int,
    tensors: list[torch.Tensor],
    grad_out: torch.Tensor,
    compiled: bool = True,
):
    """Output and input gradients of masked attention through `backend`, compiled as in training."""
    q, k, v = (t.detach().clone().requires_grad_() for t in tensors)

    def attend(ids, q, k, v):
        return DocMask(ids, BOS, max_len, backend=backend).attend(q, k, v)

    fn = torch.compile(attend, fullgraph=True, dynamic=False) if compiled else attend
    y = fn(ids, q, k, v)
    y.backward(grad_out)
    return y.float(), [t.grad.float() for t in (q, k, v)]


def backends() -> list[str]:
    names = ["flex"]
    if docmask._try_varlen() is not None:
        names.append("varlen")
    return names


@pytest.mark.parametrize("max_len", [0, 512])
@pytest.mark.parametrize("B,T", [(4, 2048), (2, 4096)])
def test_gpu_kernels_match_dense_forward_and_backward(B, T, max_len):
    ids = packed_ids(B, T, seed=T + max_len)
    tensors = qkv(B, T, seed=1)
    grad_out = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    ref_y, ref_g = run("dense", ids, max_len, tensors, grad_out)
    for name in backends():
        y, grads = run(name, ids, max_len, tensors, grad_out)
        assert_near(y, ref_y, FWD_TOL, f"{name} forward")
        for which, got, want in zip("qkv", grads, ref_g, strict=True):
            assert_near(got, want, BWD_TOL, f"{name} d{which}")


def test_long_row_keeps_documents_apart_on_gpu():
    """One 16k-token row (the records' micro-batch shape, too long for the dense mask): flex under
    the cap gives each segment what dense attention gives that segment alone, forward and backward."""
    T, cap = 16384, 2048
    ids = packed_ids(1, T, seed=5)
    q, k, v = qkv(1, T, seed=2)
    grad_out = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    y, grads = run("flex", ids, cap, [q, k, v], grad_out)
    seg = docmask.segment_ids(ids, BOS, cap)[0]
    starts = torch.nonzero(torch.diff(seg, prepend=seg[:1] - 1)).flatten().tolist() + [T]
    for s, e in list(zip(starts[:-1], starts[1:]))[:12]:  # the first dozen segments, each alone
        alone = [t[:, s:e] for t in (q, k, v)]
        y_a, g_a = run("dense", ids[:, s:e], 0, alone, grad_out[:, s:e], compiled=False)
        assert_near(y[:, s:e], y_a, FWD_TOL, f"segment {s}:{e} forward")
        for which, got, want in zip("qkv", grads, g_a, strict=True):
            assert_near(got[:, s:e], want, BWD_TOL, f"segment {s}:{e} d{which}")


@pytest.mark.parametrize("T", [2048, 65536])
def test_scoring_graph_compiles_under_inference_mode(T):
    """The scoring form: forward only, under inference mode, q/k/v fresh from pointwise ops and the
    mask built in the same graph. `experiment=pr1775` failed here on an H100 (torch 2.11) in the
    flex lowering while its training graph compiled; 65,536 is its packed scoring row."""
    ids = packed_ids(1, T, seed=7)
    x = torch.randn(1, T, H * D, device="cuda", dtype=torch.bfloat16)
    gain = torch.rand(H, device="cuda") + 1.0

    def score(ids, x, gain):
        q = x.view(1, T, H, D) * gain.to(x.dtype)[None, None, :, None]
        k = x[..., : HKV * D].reshape(1, T, HKV, D) * 1.5
        v = x[..., HKV * D :].reshape(1, T, HKV, D)
        return DocMask(ids, BOS, 2048, backend=name).attend(q, k, v)

    seg = docmask.segment_ids(ids, BOS, 2048)[0]
    starts = torch.nonzero(torch.diff(seg, prepend=seg[:1] - 1)).flatten().tolist() + [T]
    spans = list(zip(starts[:-1], starts[1:]))
    spans = spans[:6] + spans[-6:]  # the first and the last segments of the row, each alone
    for name in backends():
        with torch.inference_mode():
            y = torch.compile(score, fullgraph=True, dynamic=False)(ids, x, gain)
            torch.cuda.synchronize()  # a faulting kernel fails here, under its own backend's name
            torch._dynamo.reset()
            assert y.shape == (1, T, H, D) and torch.isfinite(y).all(), name
            # the values, not just the compile: a mask built from a buffer freed too early scores
            # with garbage segment ids (the 2026-12-06 bench saw an illegal memory access after flex)
            for s, e in spans:
                q = x[:, s:e].view(1, e - s, H, D) * gain.to(x.dtype)[None, None, :, None]
                k = x[:, s:e, : HKV * D].reshape(1, e - s, HKV, D) * 1.5
                v = x[:, s:e, HKV * D :].reshape(1, e - s, HKV, D)
                alone = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
                ).transpose(1, 2)
                assert_near(y[:, s:e], alone, FWD_TOL, f"{name} scoring, segment {s}:{e}")


def test_tile_mask_equals_create_block_mask_at_the_packed_shape():
    """`docmask.doc_block_mask` compiled on the GPU, as the training graph builds it, at #1775's
    packed micro-batch (one row of 98,304 tokens, documents cut at 2,048), against torch's
    create_block_mask: every tensor of the two BlockMasks equal."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = packed_ids(1, 98_304, seed=5)
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    names += tuple(n.replace("kv", "q", 1) for n in names)

    def tiles(ids):
        seg = docmask.segment_ids(ids, BOS, 2048)
        bm = docmask.doc_block_mask(seg, lambda b, h, q, k: (q >= k) & (seg[b, q] == seg[b, k]))
        return [getattr(bm, n) for n in names]

    def pairs(ids):  # compiled: eager create_block_mask would hold a 9.7 GB (T, T) mask
        seg = docmask.segment_ids(ids, BOS, 2048)
        T = ids.size(1)
        bm = create_block_mask(
            lambda b, h, q, k: (q >= k) & (seg[b, q] == seg[b, k]), 1, None, T, T, device="cuda"
        )
        return [getattr(bm, n) for n in names]

    want = torch.compile(pairs, fullgraph=True, dynamic=False)(ids)
    got = torch.compile(tiles, fullgraph=True, dynamic=False)(ids)
    for name, a, b in zip(names, got, want):
        assert torch.equal(a, b), name
