"""Training token loaders. `sequential` is the baseline's stream (TECHNIQUES §2.1 / ROOT).

Each `next_batch` consumes one contiguous chunk of world_size*(local_tokens+1) tokens from the
stream and hands rank r the r-th span; the +1 gives the shifted targets. With grad_accum =
8 // world_size, the micro-batches of all ranks over one step are exactly the 8 micro-batches a
single process reads, so every world size trains on the same global batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import load_tokens


class TokenStream:
    """Reads shards in order, forever; memmapped so opening a 100M-token shard costs nothing."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.file_idx = 0
        self.tokens = load_tokens(files[0], mmap=True)
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        chunks = []
        while n > 0:
            avail = self.tokens.size - self.pos
            if avail <= 0:
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens = load_tokens(self.files[self.file_idx], mmap=True)
                self.pos = 0
                continue
            k = min(n, avail)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class SequentialLoader:
    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, slots: int = 4):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.stream = TokenStream(files)
        self.pin = device.type == "cuda"
        # A small ring of pinned host buffers: the H2D copy is asynchronous, so a buffer is reused
        # only after the copy that read it has finished (its event).
        self._ring: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._slot = 0
        self._slots = slots

    def _host_buffer(self, n: int) -> torch.Tensor:
        if not self.pin:
            return torch.empty(n, dtype=torch.int32)
        if len(self._ring) < self._slots:
            self._ring.append((torch.empty(n, dtype=torch.int32, pin_memory=True), None))
        idx = self._slot % len(self._ring)
        self._slot += 1
        buf, event = self._ring[idx]
        if event is not None:
            event.synchronize()
        if buf.numel() < n:
            buf = torch.empty(n, dtype=torch.int32, pin_memory=True)
        self._ring[idx] = (buf, None)
        self._current = idx
        return buf[:n]

    def next_batch(
        self, global_tokens: int, seq_len: int, grad_accum: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        local = global_tokens // (self.world_size * grad_accum)
        span = local + 1
        chunk = self.stream.take(span * self.world_size)
        mine = chunk[self.rank * span : (self.rank + 1) * span]
        host = self._host_buffer(span)
        host.numpy()[:] = mine  # uint16 -> int32 while copying into the pinned buffer
        if self.pin:
            dev = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._ring[self._current] = (self._ring[self._current][0], event)
        else:
            dev = host.clone()
        dev = dev.long()
        return dev[:-1].view(-1, seq_len), dev[1:].view(-1, seq_len)


def build_loader(
    name: str, files: list[Path], rank: int, world_size: int, device: torch.device
) -> SequentialLoader:
    if name != "sequential":
        raise ValueError(f"data.loader={name!r} is not implemented; valid choices: sequential")
    return SequentialLoader(files, rank, world_size, device)
