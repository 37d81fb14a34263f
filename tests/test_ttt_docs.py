"""Documents and the phased-TTT schedule on a synthetic stream."""

from __future__ import annotations

import numpy as np
import pytest

from pgolf.ttt.docs import doc_queue, find_docs, pause_points, phase_boundaries, phase_doc_sets

BOS = 1


def synthetic(lengths: list[int], seed: int = 0) -> np.ndarray:
    """Documents of the given token counts (BOS + body), concatenated."""
    rng = np.random.default_rng(seed)
    parts = [np.concatenate([[BOS], rng.integers(2, 48, n - 1)]) for n in lengths]
    return np.concatenate(parts).astype(np.uint16)


def test_documents_span_through_the_next_bos():
    lengths = [5, 3, 8, 2, 6]
    s = synthetic(lengths)
    docs = find_docs(s, BOS)
    assert [d.start for d in docs] == list(np.cumsum([0] + lengths[:-1]))
    # each document's last target is the next BOS; the last one runs to the end of the stream
    assert [d.length for d in docs] == [6, 4, 9, 3, 6]
    for d in docs[:-1]:
        lo, hi = d.targets
        assert s[hi] == BOS and (s[lo + 1 : hi] != BOS).all()
    # targets of consecutive documents tile the stream's targets exactly once
    covered = np.zeros(s.size - 1, dtype=int)
    for d in docs:
        covered[slice(*d.targets)] += 1
    assert (covered == 1).all()


def test_stream_must_start_with_bos():
    with pytest.raises(ValueError, match="start with BOS"):
        find_docs(np.array([5, 1, 4, 4], dtype=np.uint16), BOS)


def test_phase_boundaries_match_the_records():
    assert phase_boundaries(2000, 3) == [666, 1333, 2000]  # R0414
    assert phase_boundaries(2500, 3) == [833, 1666, 2500]  # R0427A
    assert phase_boundaries(2000, 1) == [2000]  # R0413 (phased, one pause)


def test_queue_order_and_phase_document_sets():
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 40, 50).tolist()
    docs = find_docs(synthetic(lengths), BOS)
    queue = doc_queue(docs, batch_size=8)
    # batches longest first, every document once; cut from the short end, so the partial batch
    # (50 = 6 x 8 + 2) holds the longest documents and comes first
    assert sorted(d.index for b in queue for d in b) == list(range(len(docs)))
    assert [len(b) for b in queue] == [2] + [8] * 6
    maxes = [max(d.length for d in b) for b in queue]
    assert maxes == sorted(maxes, reverse=True)
    assert min(d.length for d in queue[0]) >= max(d.length for d in queue[1])
    sets = phase_doc_sets(queue, prefix_docs=30, num_phases=3)
    flat = [d for b in queue for d in b]
    assert [len(x) for x in sets] == [10, 20, 30]
    assert sets[0] == flat[:10] and sets[1] == flat[:20] and sets[2] == flat[:30]  # cumulative
    # pauses: after the batch that completes the boundary document
    ends = np.cumsum([len(b) for b in queue])
    for boundary, k in zip(phase_boundaries(30, 3), pause_points(queue, 30, 3)):
        assert ends[k - 1] >= boundary and (k == 1 or ends[k - 2] < boundary)


def test_prefix_larger_than_the_stream_is_clamped():
    docs = find_docs(synthetic([4, 4, 4]), BOS)
    queue = doc_queue(docs, 2)
    assert [len(s) for s in phase_doc_sets(queue, 100, 2)] == [3, 3]
    assert pause_points(queue, 100, 2) == [2, 2]
