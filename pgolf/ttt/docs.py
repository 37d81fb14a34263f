"""Documents of the validation stream and the phased-TTT schedule (docs/techniques.md#phased-ttt).

Documents start at BOS. A document spans from its BOS through the next document's BOS inclusive,
so its last prediction target is that BOS (the final document runs to the end of the stream);
it has `length - 1` targets, at stream target indices [start, start + length - 1).

The queue: documents sorted by length (stable), cut into batches of `batch_size`, batches taken
longest first. Phased TTT pauses after prefix_docs * (p+1) // num_phases documents of that queue
order have been scored and runs global SGD on exactly those documents (cumulative).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Doc:
    index: int  # order in the stream
    start: int  # stream position of its BOS
    length: int  # tokens from its BOS through the next BOS (inclusive)

    @property
    def targets(self) -> tuple[int, int]:
        """[lo, hi) target indices it scores (target t predicts token t+1)."""
        return self.start, self.start + self.length - 1


def find_docs(stream: np.ndarray, bos_id: int) -> list[Doc]:
    starts = np.flatnonzero(stream == bos_id)
    if starts.size == 0 or starts[0] != 0:
        raise ValueError(
            f"per-document TTT needs every document to start with BOS (id {bos_id}); the validation stream "
            f"{'has no BOS' if starts.size == 0 else f'starts with token {int(stream[0])}'} (see "
            "docs/techniques.md#data-format)"
        )
    ends = np.append(starts[1:] + 1, stream.size)  # through the next BOS inclusive
    docs = [Doc(i, int(s), int(e - s)) for i, (s, e) in enumerate(zip(starts, ends))]
    return [d for d in docs if d.length >= 2]  # a trailing lone BOS has nothing to predict


def doc_queue(docs: list[Doc], batch_size: int) -> list[list[Doc]]:
    """Length-sorted batches, longest batch first (positions inside a batch: ascending length)."""
    order = sorted(docs, key=lambda d: (d.length, d.index))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[::-1]


def phase_boundaries(prefix_docs: int, num_phases: int) -> list[int]:
    """Queue positions after which global SGD runs: e.g. 2000 docs, 3 phases -> 666, 1333, 2000."""
    return [prefix_docs * (p + 1) // num_phases for p in range(num_phases)]


def phase_doc_sets(queue: list[list[Doc]], prefix_docs: int, num_phases: int) -> list[list[Doc]]:
    """The documents each phase's global SGD trains on: the first `boundary` documents of the queue,
    ordered by (batch index, position in batch); cumulative over phases."""
    flat = [d for batch in queue for d in batch]
    return [flat[: min(b, len(flat))] for b in phase_boundaries(prefix_docs, num_phases)]


def pause_points(queue: list[list[Doc]], prefix_docs: int, num_phases: int) -> list[int]:
    """For each phase, the number of batches completed when it pauses: the first batch whose end
    carries the completed-document count to the boundary or past it."""
    ends = np.cumsum([len(b) for b in queue])
    out = []
    for b in phase_boundaries(prefix_docs, num_phases):
        b = min(b, int(ends[-1]) if ends.size else 0)
        out.append(int(np.searchsorted(ends, b)) + 1 if b > 0 else 0)
    return out
