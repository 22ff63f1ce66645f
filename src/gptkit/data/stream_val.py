"""Fixed val batches for a streamed run: held-out documents read once into windows.

The val sources are `data.val_sources` (raw sources as given, e.g. `hf:NAME@validation`; a prepared
folder gives its val split), or else the val splits of the prepared folders among `data.sources`.
Each source's documents are read in order, concatenated and cut into windows of block_size + 1
tokens (every position is scored, as shard val batches are), until the source has its share of the
`eval.batches` x micro-batch windows: shares follow the weights. The windows are read once, before
training, and are the same at every evaluation and on every rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from gptkit.config import DataConfig, SourceConfig
from gptkit.data.batch import Batch
from gptkit.data.streams import DocumentStream, is_prepared
from gptkit.tokenizer import Tokenizer


def val_sources(data: DataConfig) -> list[SourceConfig]:
    """`data.val_sources`, or the prepared sources (whose val split is read)."""
    if data.val_sources is not None:
        return data.val_sources
    return [c for c in data.stream_sources() if is_prepared(c.path)]


def stream_val_batches(
    data: DataConfig, tokenizer: Tokenizer, n_batches: int, batch_size: int, block_size: int
) -> tuple[list[Batch] | None, str]:
    """The val batches, or None and why there are none."""
    configs = val_sources(data)
    if not configs:
        return None, (
            "streaming: no val loss (no source is a prepared folder with a val split); set data.val_sources"
        )
    wanted = n_batches * batch_size
    total = sum(c.weight for c in configs)
    quotas = [max(1, round(wanted * c.weight / total)) for c in configs]
    rows: list[np.ndarray] = []
    for config, quota in zip(configs, quotas, strict=True):
        stream = DocumentStream(config, tokenizer, split="val")
        rows += itertools.islice(_windows(stream, block_size), quota)
    if not rows:
        names = ", ".join(c.path for c in configs)
        return None, f"streaming: no val loss: {names} hold fewer than {block_size + 1} tokens"
    size = min(batch_size, len(rows))
    data_rows = torch.from_numpy(np.stack(rows[: len(rows) // size * size]))
    batches = [data_rows[i : i + size] for i in range(0, len(data_rows), size)]
    return [Batch(b[:, :-1], b[:, 1:]) for b in batches], ""


def _windows(stream: DocumentStream, block_size: int) -> Iterator[np.ndarray]:
    """Windows of block_size + 1 tokens, block_size apart, over the source's documents in order."""
    carry = np.zeros(0, dtype=np.int64)
    reader = stream.epoch()
    try:
        for doc, _ in reader:
            carry = np.concatenate([carry, doc.astype(np.int64)])
            while len(carry) >= block_size + 1:
                yield carry[: block_size + 1]
                carry = carry[block_size:]
    finally:
        close = getattr(reader, "close", None)
        if close is not None:
            close()
