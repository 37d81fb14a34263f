"""Sliding-window eval: the window rule, and the device scorer against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.data.bpb import ByteTables
from pgolf.eval.sliding import WindowScorer, evaluate_sliding, rank_slice
from pgolf.eval.val import ByteLUT, evaluate
from pgolf.eval.windows import assign_chunks, scored_ranges, window_starts
from pgolf.models.config import BankedGPTConfig
from pgolf.models.gpt import GPT

V = 48
CPU = torch.device("cpu")


def tables(v: int = V) -> ByteTables:
    rng = np.random.default_rng(0)
    boundary = np.zeros(v, dtype=bool)
    boundary[:2] = True
    return ByteTables(rng.integers(0, 4, v).astype(np.int16), rng.random(v) < 0.4, boundary)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = BankedGPTConfig(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0)
    return GPT(cfg, banked=True).eval()


def stream(n_tokens: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, n_tokens).astype(np.uint16)


def scorer(model, toks, L, stride, B=3, record=True) -> WindowScorer:
    return WindowScorer(
        model.token_nll, toks, L, stride, B, ByteLUT(tables(), CPU), CPU, torch.float32, record=record
    )


@pytest.mark.parametrize("L,stride", [(1, 1), (8, 1), (8, 3), (8, 8), (16, 5), (16, 16), (7, 2)])
def test_window_rule_tiles_every_target_exactly_once(L, stride):
    for n in range(0, 4 * L + 3 * stride + 3):
        starts = window_starts(n, L, stride)
        lo, hi = scored_ranges(starts, n, L, stride)
        counts = np.zeros(n, dtype=int)
        for a, b in zip(lo, hi):
            assert a < b, (n, a, b)  # every kept window scores something
            counts[a:b] += 1
        assert (counts == 1).all(), (n, counts)
        # every scored target after the first window sees >= L - stride tokens of context
        assert all(a - s >= L - stride for s, a in zip(starts[1:], lo[1:]))
        # contiguous tiling, left to right
        assert (lo[1:] == hi[:-1]).all()


def test_window_rule_matches_the_spec_formula():
    n, L, s = 1000, 64, 16
    starts = window_starts(n, L, s)
    expected = [ws for ws in range(0, n, s) if ws == 0 or ws + (L - s) < n]
    assert starts.tolist() == expected


def test_chunk_assignment_uses_first_scored_target():
    n, L, s, C = 300, 32, 8, 50
    starts = window_starts(n, L, s)
    lo, _ = scored_ranges(starts, n, L, s)
    chunks = assign_chunks(starts, n, L, s, C)
    assert (chunks == np.minimum(lo // C, (n + C - 1) // C - 1)).all()
    assert (np.diff(chunks) >= 0).all()


@pytest.mark.parametrize("n_tokens", [2, 9, 17, 33, 64, 65, 100])
def test_scorer_scores_each_target_once_and_matches_full_context_reference(n_tokens):
    model, toks = tiny_model(), stream(n_tokens)
    L, stride = 16, 5
    sc = scorer(model, toks, L, stride)
    sums = torch.zeros(3, dtype=torch.float64)
    sc.score(sc.starts(), sums)
    n = n_tokens - 1
    assert sc.count[:n].tolist() == [1] * n
    # reference: each target's NLL under its own window, computed one window at a time, unbatched
    x_all = torch.from_numpy(toks.astype(np.int64))
    ref = torch.full((n,), float("nan"), dtype=torch.float64)
    for ws, a, b in zip(sc.starts(), *sc.ranges(sc.starts())):
        e = min(ws + L, n)
        with torch.no_grad():
            nll = model.token_nll(x_all[ws:e][None], x_all[ws + 1 : e + 1][None])[0]
        ref[a:b] = nll[a - ws : b - ws].double()
    torch.testing.assert_close(sc.nll[:n], ref, rtol=1e-5, atol=1e-5)
    lut = tables()
    assert sums[1].item() == n
    assert sums[2].item() == lut.token_bytes(toks[:-1].astype(np.int64), toks[1:].astype(np.int64)).sum()
    assert sums[0].item() == pytest.approx(ref.sum().item(), rel=1e-6)


def test_sliding_equals_nonoverlapping_when_stride_is_the_window():
    model, L = tiny_model(), 16
    toks = stream(5 * L + 1)
    lut = ByteLUT(tables(), CPU)
    slide = evaluate_sliding(scorer(model, toks, L, L, B=2, record=False))
    flat = evaluate(model.token_nll, toks, L, 2, lut, CPU, torch.float32)
    assert slide.tokens == flat.tokens and slide.bytes == flat.bytes
    assert slide.val_bpb == pytest.approx(flat.val_bpb, rel=1e-9)
    assert slide.val_loss == pytest.approx(flat.val_loss, rel=1e-9)


def test_batch_padding_and_rank_split_do_not_change_the_score():
    model, toks = tiny_model(), stream(120)
    base = evaluate_sliding(scorer(model, toks, 16, 4, B=1, record=False))
    for B in (2, 5, 64):
        res = evaluate_sliding(scorer(model, toks, 16, 4, B=B, record=False))
        assert res.val_bpb == pytest.approx(base.val_bpb, rel=1e-9)
    # ranks: the union of contiguous per-rank slices is every window, once
    sc = scorer(model, toks, 16, 4, B=3)
    starts = sc.starts()
    parts = [starts[rank_slice(starts.size, r, 3)] for r in range(3)]
    sums = torch.zeros(3, dtype=torch.float64)
    for p in parts:
        sc.score(p, sums)
    assert sums[1].item() == toks.size - 1 and (sc.count[: toks.size - 1] == 1).all()
    assert sums[0].item() / sums[1].item() == pytest.approx(base.val_loss, rel=1e-9)


def test_warmup_never_reads_the_stream():
    model, toks = tiny_model(), stream(80)
    sc = scorer(model, toks, 16, 4, record=True)
    real = sc.stream
    sc.warmup()
    assert sc.stream is real and int(sc.count.sum()) == 0


@pytest.mark.slow
def test_compiled_scorer_has_two_graphs_made_in_warmup_and_matches_eager():
    """The tail graph (every window but the first) and the one-window graph: both compiled in
    warm-up on random tokens, none while scoring, and the same sums as the eager scorer."""
    import torch._dynamo

    model, toks = tiny_model(), stream(150)
    eager = evaluate_sliding(scorer(model, toks, 16, 4, B=4, record=False))
    torch._dynamo.reset()
    sc = WindowScorer(
        model.token_nll, toks, 16, 4, 4, ByteLUT(tables(), CPU), CPU, torch.float32, compile=True
    )
    sc.warmup()
    torch._dynamo.config.error_on_recompile = True
    try:
        res = evaluate_sliding(sc)
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    assert res.tokens == eager.tokens and res.bytes == eager.bytes
    assert res.val_loss == pytest.approx(eager.val_loss, rel=1e-5)


def test_lossless_quant_round_trips_bit_for_bit():
    from pgolf.quant.config import LosslessConfig
    from pgolf.quant.lossless import Lossless

    model = tiny_model().bfloat16()
    state = model.state_dict()
    q = Lossless(LosslessConfig())
    back = q.load(q.export(state))
    assert list(back) == list(state)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())


def test_eval_cudnn_attention_applies_to_graphs_made_at_eval_warmup_and_reprimes_nonoverlap():
    """hardware.eval_cudnn_attention puts cuDNN first before the eval graphs are traced (and not at
    all when off). Dynamo guards on the choice, so the nonoverlap graph compiled during training is
    compiled again in the warm-up: otherwise it would recompile inside the timed eval."""
    from types import SimpleNamespace

    from pgolf.hw.config import CudaHardwareConfig
    from pgolf.models import attention
    from pgolf.trainer import Trainer

    calls: list[tuple] = []
    scorer_stub = SimpleNamespace(warmup=lambda: calls.append(("sliding", attention.sdpa_backends())))
    model_stub = SimpleNamespace(eval=lambda: None, train=lambda: None)
    logs: list[str] = []
    try:
        for flag in (False, True):
            attention.set_sdpa_backends(None)
            job = SimpleNamespace(
                hardware=CudaHardwareConfig(eval_cudnn_attention=flag),
                eval=SimpleNamespace(modes=["nonoverlap", "sliding"]),
            )
            stub = SimpleNamespace(
                job=job,
                ttt=SimpleNamespace(enabled=False),
                model=model_stub,
                rt=SimpleNamespace(compile=True, world_size=1, eval_cudnn_attention=flag),
                log=logs.append,
            )
            stub._scorer = lambda: scorer_stub
            stub._prime_eval = lambda: calls.append(("nonoverlap", attention.sdpa_backends()))
            Trainer.warm_eval(stub)
        cudnn_first = ["cudnn", "flash", "efficient", "math"]
        assert calls == [("sliding", None), ("nonoverlap", cudnn_first), ("sliding", cudnn_first)]
        assert len(logs) == 2 and all(line.startswith("eval warm-up: compiling") for line in logs)
    finally:
        attention.set_sdpa_backends(None)


def test_changing_the_sdpa_backends_recompiles_graphs_traced_before():
    """Why the warm-up re-primes: a graph traced under one kernel list is not reused under another."""
    from pgolf.models import attention

    compiles = []

    def count(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    q, k = torch.randn(2, 16, 4, 8), torch.randn(2, 16, 2, 8)
    torch._dynamo.reset()
    fn = torch.compile(attention.causal_attention, backend=count, fullgraph=True)
    try:
        fn(q, k, k)
        fn(q, k, k)
        assert len(compiles) == 1
        attention.set_sdpa_backends(["cudnn", "flash", "efficient", "math"])
        fn(q, k, k)
        assert len(compiles) == 2
    finally:
        attention.set_sdpa_backends(None)
        torch._dynamo.reset()


def test_sdpa_backend_choice_is_recorded_in_the_traced_graph():
    """The kernel list is part of the graph Dynamo hands on (so of the compile caches' keys): a graph
    traced with cuDNN first differs from one traced under the global flags, and computes the same."""
    from pgolf.models import attention

    codes: list[str] = []

    def capture(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    q = torch.randn(2, 16, 4, 8)
    k = torch.randn(2, 16, 2, 8)
    outs = []
    try:
        for names in (None, ["cudnn", "flash", "efficient", "math"]):
            attention.set_sdpa_backends(names)
            torch._dynamo.reset()
            outs.append(torch.compile(attention.causal_attention, backend=capture, fullgraph=True)(q, k, k))
    finally:
        attention.set_sdpa_backends(None)
        torch._dynamo.reset()
    assert "CUDNN_ATTENTION" not in codes[0] and "CUDNN_ATTENTION" in codes[1]
    torch.testing.assert_close(outs[0], outs[1])
    with pytest.raises(ValueError, match="choose from"):
        attention.set_sdpa_backends(["cudnn", "fast"])
