"""Calibration text the model writes itself, for GPTQ without data (docs/techniques.md#gptq-calibration).

After training, the model samples sequences at a temperature, the first token uniform over the
vocabulary, from a seeded generator, re-running the whole prefix for every new token (no KV cache:
the models have none, and this runs once). No training or validation data is read.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


@torch.no_grad()
def sample_sequences(
    model: torch.nn.Module,
    vocab_size: int,
    n_seqs: int,
    seq_len: int,
    batch: int,
    temperature: float,
    seed: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> Iterator[Tensor]:
    """Yield (b, seq_len) token batches, `n_seqs` sequences in all."""
    logits_of = getattr(model, "_logits", None)
    if logits_of is None:
        raise TypeError(f"{type(model).__name__} has no _logits(ids); quant.calibration.source=self needs it")
    g = torch.Generator(device=device).manual_seed(seed)
    use_amp = autocast_dtype not in (None, torch.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n_seqs, batch):
            b = min(batch, n_seqs - start)
            ids = torch.randint(0, vocab_size, (b, 1), generator=g, device=device)
            for _ in range(seq_len - 1):
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=use_amp):
                    logits = logits_of(ids)[:, -1].float()
                probs = torch.softmax(logits / temperature, dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
            yield ids
    finally:
        model.train(was_training)
