"""Document-masked attention (model.doc_mask): the kernels against a per-token reference mask, and
no attention across documents, shown by perturbing one document and watching the next."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.data.boundaries import document_boundaries
from pgolf.models import docmask
from pgolf.models.config import LayeredGPTConfig
from pgolf.models.docmask import DocMask, dense_doc_mask, segment_ids, select_doc_backend, varlen_cu_seqlens
from pgolf.models.gpt import GPT
from pgolf.registry import ConfigError

BOS = 1
V = 64
TINY = dict(vocab_size=V, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, bos_id=BOS)


@pytest.fixture(autouse=True)
def _default_backend():
    """Each test picks its kernel explicitly; none leaks into the next."""
    yield
    docmask._DOC_BACKEND = None


def packed_rows() -> torch.Tensor:
    """Two rows of 96 tokens: row 0 starts mid-document (no BOS at 0) and holds three documents,
    row 1 is one document longer than the row (no BOS at all) but for a BOS near its end."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, V, (2, 96), generator=g)
    ids[0, [20, 21, 57]] = BOS  # a one-token document at 20
    ids[1, 90] = BOS
    return ids


def reference_mask(ids: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """(B, T, T) True = attend, built token by token from the definition, with Python loops."""
    B, T = ids.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        doc_start = 0
        seg = []
        for t in range(T):
            if t == 0 or ids[b, t] == BOS:
                doc_start = t
            seg_start = doc_start + ((t - doc_start) // max_len) * max_len if max_len else doc_start
            seg.append(seg_start)
        for i in range(T):
            for j in range(i + 1):
                mask[b, i, j] = seg[i] == seg[j]
    return mask


def reference_attention(q, k, v, mask):
    """fp64 softmax attention with repeated K/V under a (B, Tq, Tk) mask."""
    rep = q.size(2) // k.size(2)
    k, v = (t.repeat_interleave(rep, dim=2).double() for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / q.size(-1) ** 0.5
    s = s.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def qkv(B=2, T=96, H=4, Hkv=2, D=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, D, generator=g) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize("max_len", [0, 16])
def test_segment_mask_matches_definition(max_len):
    ids = packed_rows()
    ref = reference_mask(ids, max_len)
    assert torch.equal(dense_doc_mask(segment_ids(ids, BOS, max_len), ids.size(1))[:, 0], ref)
    # the last-rows form is the bottom of the square
    assert torch.equal(dense_doc_mask(segment_ids(ids, BOS, max_len), 10)[:, 0], ref[:, -10:])


@pytest.mark.parametrize("max_len", [0, 16])
def test_cu_seqlens_match_host_boundaries(max_len):
    """The device-built varlen cu_seqlens hold the same segments as pgolf.data.boundaries (the
    host version, with the records' segment rule), in a fixed-length layout."""
    ids = packed_rows()
    cu = varlen_cu_seqlens(segment_ids(ids, BOS, max_len))
    host = document_boundaries(ids.numpy(), BOS, max_doc_len=max_len, bucket=1)
    assert cu.shape == (ids.numel() + 1,)
    assert np.array_equal(np.unique(cu.numpy()), np.unique(host.cu_seqlens))


@pytest.mark.parametrize("backend", ["dense", "flex"])
@pytest.mark.parametrize("max_len", [0, 16])
def test_backend_matches_reference(backend, max_len):
    """Rows that start mid-document, a one-token document, a document longer than the row, GQA."""
    ids = packed_rows()
    q, k, v = qkv()
    ref = reference_attention(q, k, v, reference_mask(ids, max_len))
    with torch.no_grad():  # flex has no CPU backward
        y = DocMask(ids, BOS, max_len, backend=backend).attend(q, k, v)
    torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=1e-5)


def fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """FA3's varlen contract on the CPU: (total, H, D) tensors, each [cu[i], cu[i+1]) attended on
    its own; checks the arguments the real kernel would trust."""
    assert cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32 and causal
    cu = cu_seqlens_q.tolist()
    assert cu[0] == 0 and cu[-1] == q.size(0) and cu == sorted(cu)
    out = torch.zeros_like(q)
    for a, b in zip(cu[:-1], cu[1:]):
        assert b - a <= max_seqlen_q == max_seqlen_k
        if b > a:
            seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
            y = F.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=True)
            out[a:b] = y[0].transpose(0, 1)
    return out, None  # some FA3 builds also return the LSE


@pytest.mark.parametrize("max_len", [0, 16])
def test_varlen_glue_matches_reference(max_len, monkeypatch):
    """The FA3 path's flattening, cu_seqlens and max_seqlen, against the reference mask (the kernel
    itself needs a Hopper GPU; a CPU stand-in with its contract takes its place)."""
    monkeypatch.setattr(docmask, "_VARLEN_FN", fake_varlen)
    ids = packed_rows()
    q, k, v = qkv()
    y = DocMask(ids, BOS, max_len, backend="varlen").attend(q, k, v)
    ref = reference_attention(q, k, v, reference_mask(ids, max_len))
    torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=1e-5)


def test_last_rows_matches_reference():
    ids = packed_rows()
    q, k, v = qkv()
    ref = reference_attention(q, k, v, reference_mask(ids))[:, -24:]
    y = DocMask(ids, BOS, backend="dense").attend_last_rows(q[:, -24:], k, v)
    torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=1e-5)


def test_varlen_is_only_chosen_where_fa3_imports():
    assert select_doc_backend("auto", "cpu") == "dense"
    assert select_doc_backend("flex", "cpu") == "flex"
    with pytest.raises(RuntimeError, match="FlashAttention-3"):
        select_doc_backend("varlen", "cpu")
    with pytest.raises(ValueError, match="choose from"):
        select_doc_backend("xformers", "cpu")


def test_doc_max_len_needs_doc_mask():
    with pytest.raises(ConfigError, match="doc_mask"):
        LayeredGPTConfig(**TINY, doc_max_len=32).validate("model")
    LayeredGPTConfig(**TINY, doc_mask=True, doc_max_len=32).validate("model")


# ------------------------------------------------------------------------------------------
# No attention across documents, through the whole model
# ------------------------------------------------------------------------------------------
# Token-mixing paths other than attention (SmearGate, bigram hash) stay off: they carry the
# previous token across a BOS by design. Everything else that attention feeds is on.
MIXING_OFF = dict(
    TINY,
    resid_mix=True,
    unet_skips=True,
    skip_gates_enabled=True,
    xsa_last_n=2,
    ve_enabled=True,
    ve_dim=16,
    ve_layers=[1, 2],
    parallel_residual="gptj",
    parallel_start_layer=1,
    num_loops=1,
    loop_start=1,
    loop_end=1,
    logit_softcap=30.0,
)


def two_docs(T=48, boundary=20, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """A row holding the tail of document k (positions < boundary) and document k+1 from its BOS,
    and the same row with document k's tokens changed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (2, T), generator=g)
    ids[:, boundary] = BOS
    changed = ids.clone()
    changed[:, :boundary] = torch.randint(2, V, (2, boundary), generator=g)
    return ids, changed


def model(doc_mask: bool, **extra) -> GPT:
    torch.manual_seed(0)
    cfg = LayeredGPTConfig(**{**MIXING_OFF, "doc_mask": doc_mask, **extra})
    cfg.validate("model")
    m = GPT(cfg, banked=False).eval()
    with torch.no_grad():  # zero-initialized projections would hide every path: wake them up
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_changing_a_document_never_changes_the_next(backend):
    docmask._DOC_BACKEND = backend
    ids, changed = two_docs()
    m = model(doc_mask=True)
    with torch.no_grad():
        a, b = m._logits(ids), m._logits(changed)
        # sliding scoring runs the final layer for the last rows only: the same must hold there
        a_last, b_last = m._logits(ids, last=16), m._logits(changed, last=16)
    assert not torch.equal(a[:, :20], b[:, :20])  # the change reached document k itself
    assert torch.equal(a[:, 20:], b[:, 20:])  # and nothing of document k+1
    assert torch.equal(a_last, b_last)
    torch.testing.assert_close(a_last, a[:, -16:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["two_lane", "two_lane_seq", "split_lane"])
def test_lane_forms_carry_the_mask(form):
    """The two-stream residual forms hand the mask to their attention sub-blocks too."""
    docmask._DOC_BACKEND = "dense"
    ids, changed = two_docs()
    m = model(doc_mask=True, parallel_residual=form, parallel_start_layer=1)
    with torch.no_grad():
        a, b = m._logits(ids), m._logits(changed)
    assert not torch.equal(a[:, :20], b[:, :20]) and torch.equal(a[:, 20:], b[:, 20:])


def test_without_the_mask_the_next_document_does_change():
    """The perturbation test can fail: the same change reaches document k+1 with the mask off."""
    ids, changed = two_docs()
    m = model(doc_mask=False)
    with torch.no_grad():
        assert not torch.allclose(m._logits(ids)[:, 20:], m._logits(changed)[:, 20:])


def test_gradients_never_cross_documents():
    """Training: document k+1's loss has no gradient with respect to document k's embeddings."""
    docmask._DOC_BACKEND = "dense"
    ids, _ = two_docs()
    m = model(doc_mask=True).train()
    x = m.tok_emb(ids).detach().requires_grad_()
    m.tok_emb.forward = lambda _ids: x  # the embedding output as a leaf
    logits = m._logits(ids)
    F.cross_entropy(logits[:, 20:].flatten(0, 1), ids[:, 20:].flatten()).backward()
    assert x.grad[:, :20].abs().max() == 0
    assert x.grad[:, 20:].abs().max() > 0


def test_mask_with_length_cap_splits_a_long_document():
    """doc_max_len = 8: position 16 starts a new segment of the same document, so changing
    positions < 16 leaves positions >= 16 unchanged, although no BOS separates them."""
    docmask._DOC_BACKEND = "dense"
    ids, changed = two_docs(T=32, boundary=31)
    m = model(doc_mask=True, doc_max_len=8)
    changed[:, 16:] = ids[:, 16:]
    with torch.no_grad():
        assert torch.equal(m._logits(ids)[:, 16:], m._logits(changed)[:, 16:])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_mask_traces_into_one_graph(backend):
    """The mask is built from the ids without host syncs: Dynamo traces the whole forward with
    fullgraph=True (backend "eager": tracing only, no compile time), the training loss with its
    backward for dense (flex has no CPU backward), the last-rows scores for both."""
    docmask._DOC_BACKEND = backend
    torch._dynamo.reset()
    ids, _ = two_docs()
    m = model(doc_mask=True, doc_max_len=16)
    if backend == "dense":
        loss = torch.compile(m, backend="eager", fullgraph=True)(ids, ids)
        loss.backward()
        assert torch.equal(loss.detach(), m(ids, ids).detach())
    nll = torch.compile(m.token_nll, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(nll(ids, ids, 16), m.token_nll(ids, ids, 16), atol=1e-6, rtol=1e-6)


def test_flex_mask_reads_a_materialized_copy_of_the_segment_ids(monkeypatch):
    """The flex mask function captures the segment ids through `materialized` (an opaque op, so
    Inductor gives the buffer a fixed layout; see its doc), and the copy is exact."""
    seen = []
    real = docmask.materialized
    monkeypatch.setattr(docmask, "materialized", lambda t: seen.append(t) or real(t))
    ids = torch.randint(2, 50, (2, 64))
    ids[:, [0, 10, 40]] = BOS
    DocMask(ids, BOS, backend="flex")
    DocMask(ids, BOS, backend="dense")
    assert len(seen) == 1 and torch.equal(real(seen[0]), docmask.segment_ids(ids, BOS))
    compiled = torch.compile(lambda t: real(t) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(seen[0]), seen[0] * 2)


def _block_mask_tensors(bm) -> dict[str, torch.Tensor]:
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    names += ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    return {n: getattr(bm, n) for n in names}


@pytest.mark.parametrize(
    "B, T, max_len, bos_every, has_full",
    [
        (2, 1024, 0, 300, True),  # a few documents per row, boundaries anywhere
        (2, 1024, 0, 20, False),  # many short documents: most tiles empty
        (1, 2048, 256, 0, True),  # one document cut every 256 tokens: boundaries on tile edges
        (2, 1024, 100, 700, False),  # cuts shorter than a tile, off its edges
        (3, 1000, 0, 90, True),  # a ragged last tile (1000 = 7 x 128 + 104)
        (1, 100, 0, 30, False),  # shorter than one tile
        (1, 1280, 0, 128, True),  # BOS on every third tile edge and at random
    ],
)
def test_flex_block_mask_equals_create_block_mask(B, T, max_len, bos_every, has_full):
    """`doc_block_mask` reads each tile's kind off its blocks' first and last segment ids; torch's
    create_block_mask evaluates the mask at every token pair. Every tensor of the two BlockMasks
    (counts and tile orders, partial and full, both directions) must be equal, so flex runs the same
    tiles in the same order. BOS positions are drawn at random, one per `bos_every` tokens on average,
    plus BOS on some tile edges."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(T + B + max_len)
    ids = torch.randint(2, V, (B, T), generator=g)
    if bos_every:
        ids[torch.rand(B, T, generator=g) < 1 / bos_every] = BOS
        ids[:, 128:T:384] = BOS
    seg = segment_ids(ids, BOS, max_len)

    def same_doc_causal(b, h, q, k):
        return (q >= k) & (seg[b, q] == seg[b, k])

    ref = create_block_mask(same_doc_causal, B, None, T, T, device="cpu")
    got = docmask.doc_block_mask(seg, same_doc_causal)
    assert (got.seq_lengths, got.BLOCK_SIZE) == (ref.seq_lengths, ref.BLOCK_SIZE)
    want, have = _block_mask_tensors(ref), _block_mask_tensors(got)
    for name in want:
        assert have[name].dtype == want[name].dtype and torch.equal(have[name], want[name]), name
    assert (int(docmask.block_kinds(seg)[1].sum()) > 0) == has_full  # the case is what it says


@pytest.mark.slow
def test_flex_block_mask_compiles_into_one_graph():
    """Built inside a compiled forward (Inductor, fullgraph): no host syncs, the same tensors."""
    torch._dynamo.reset()
    ids = torch.randint(2, V, (2, 1000), generator=torch.Generator().manual_seed(3))
    ids[:, [5, 300, 301, 640, 900]] = BOS

    def build(ids):
        seg = segment_ids(ids, BOS, 256)
        bm = docmask.doc_block_mask(seg, lambda b, h, q, k: (q >= k) & (seg[b, q] == seg[b, k]))
        return _block_mask_tensors(bm)

    got, want = torch.compile(build, fullgraph=True)(ids), build(ids)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_flex_over_several_tiles_matches_dense(monkeypatch):
    """Rows of three 128-token tiles, so the tile-built mask has empty, full and partial tiles off
    the diagonal: flex's output equals the dense kernel's. Flex runs compiled (Inductor's CPU
    kernel, a few seconds): eager flex applies the mask function to every pair and would hide a
    wrong tile map, the compiled kernel skips empty tiles and trusts full ones, as on a GPU (a tile
    taken for full that is partial made this test fail by 2.8)."""
    import torch.nn.attention.flex_attention as fa

    torch._dynamo.reset()
    monkeypatch.setattr(fa, "flex_attention", torch.compile(fa.flex_attention, dynamic=False))
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(2, V, (2, 384), generator=g)
    ids[0, [100, 128, 129, 300]] = BOS  # a document starting on a tile edge, a one-token one
    ids[1, [256]] = BOS  # row 1: two documents, a full tile below the diagonal
    q, k, v = qkv(B=2, T=384, seed=4)
    full = docmask.block_kinds(docmask.segment_ids(ids, BOS))[1]
    assert int(full.sum()) > 0
    with torch.no_grad():
        flex = DocMask(ids, BOS, backend="flex").attend(q, k, v)
        dense = DocMask(ids, BOS, backend="dense").attend(q, k, v)
    torch.testing.assert_close(flex, dense, atol=2e-6, rtol=1e-5)
