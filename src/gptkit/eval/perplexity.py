"""Perplexity and bits per byte of a token stream, with a sliding window for long texts.

The stream starts with the end-of-text token (as documents in prepared shards end with one, and as
the harness's rolling log-likelihood starts from it), so every token of the text is predicted.
Each window reads `window` tokens; consecutive windows start `stride` tokens apart and score only
the targets the previous window did not, so every target is scored exactly once. With
stride == window the windows do not overlap (the cheapest, least context); a smaller stride gives
each scored token at least window - stride tokens of context, for more work.

  loss           mean negative log-likelihood per token, in nats
  ppl            exp(loss): token-level, so it depends on the tokenizer
  bits_per_byte  total negative log-likelihood / ln 2 / UTF-8 bytes of the scored text (the
                 end-of-text token counts 0 bytes): independent of the tokenizer, comparable
                 between models with different vocabularies
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from gptkit.config import EVAL_BATCH_SIZE
from gptkit.data.shards import PreparedData
from gptkit.errors import GptkitError
from gptkit.eval.scoring import show_progress
from gptkit.tokenizer import Tokenizer


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, scored) per window: input tokens[start:end] predicts tokens[start+1:end+1],
    of which the last `scored` targets are new. Targets 1 .. n_tokens-1 are each scored once."""
    if not 1 <= stride <= window:
        raise GptkitError(f"stride must be between 1 and the window ({window}), not {stride}")
    out: list[tuple[int, int, int]] = []
    done = 0  # targets 1 .. done are scored
    start = 0
    while done < n_tokens - 1:
        end = min(start + window, n_tokens - 1)
        out.append((start, end, end - done))
        done = end
        start += stride
    return out


_BYTE_LENGTHS: dict[str, np.ndarray] = {}


def _byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes of each token id, made once per tokenizer (every checkpoint of a run shares it)."""
    key = tokenizer.fingerprint()
    if key not in _BYTE_LENGTHS:
        lengths = np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], np.int64)
        lengths[tokenizer.eot_id] = 0
        _BYTE_LENGTHS[key] = lengths
    return _BYTE_LENGTHS[key]


def token_bytes(tokenizer: Tokenizer, ids: np.ndarray) -> int:
    """UTF-8 bytes the tokens decode to (end-of-text: 0), by a per-token table (byte-level tokenizers
    decode a sequence to the concatenation of its tokens' bytes)."""
    return int(_byte_lengths(tokenizer)[ids].sum())


@torch.no_grad()
def perplexity(
    forward: Callable[[Tensor], Tensor],
    tokens: np.ndarray,
    tokenizer: Tokenizer,
    *,
    window: int,
    stride: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of `tokens` (see the module docstring); `limit` windows."""
    stride = window if stride is None else stride
    spans = windows(len(tokens), window, stride)[:limit]
    if not spans:
        raise GptkitError("the text has fewer than 2 tokens; perplexity needs something to predict")
    nll = 0.0
    scored_ids = []
    starts = range(0, len(spans), batch_size)
    for first in tqdm(
        starts, desc="perplexity", unit="batch", disable=not show_progress(progress), leave=False
    ):
        batch = spans[first : first + batch_size]
        width = max(end - start for start, end, _ in batch)
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (start, end, _) in enumerate(batch):
            idx[row, : end - start] = torch.from_numpy(tokens[start:end].astype(np.int64))
        logits = forward(idx.to(device))
        for row, (start, end, n) in enumerate(batch):
            targets = tokens[end - n + 1 : end + 1].astype(np.int64)
            logprobs = F.log_softmax(logits[row, end - start - n : end - start].float(), dim=-1)
            picked = logprobs.gather(1, torch.from_numpy(targets).to(logprobs.device)[:, None])
            nll -= float(picked.double().sum())
            scored_ids.append(targets)
    ids = np.concatenate(scored_ids)
    n_bytes = token_bytes(tokenizer, ids)
    loss = nll / len(ids)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": len(ids),
        "bytes": n_bytes,
        "window": window,
        "stride": stride,
    }


def read_tokens(source: str | Path, tokenizer: Tokenizer, limit_tokens: int | None = None) -> np.ndarray:
    """The token stream of a prepared data folder's val shards or of a UTF-8 text file, after an
    end-of-text token; at most `limit_tokens` of it (the rest is not read)."""
    path = Path(source)
    head = np.array([tokenizer.eot_id], dtype=np.int64)
    if path.is_dir():
        data = PreparedData.open(path)
        data.check_tokenizer(tokenizer.fingerprint(), "the model")
        parts, have = [head], 1
        for shard in data.shards("val"):
            take = shard if limit_tokens is None else shard[: max(limit_tokens - have, 0)]
            parts.append(np.asarray(take, dtype=np.int64))
            have += len(take)
            if limit_tokens is not None and have >= limit_tokens:
                break
        if have < 2:
            raise GptkitError(f"{path} has no val tokens; prepare it with a val_fraction above 0")
        tokens = np.concatenate(parts)
        if int(tokens.max()) >= tokenizer.vocab_size:  # else an IndexError deep in the embedding
            raise GptkitError(
                f"the val shards of {path} hold token id {int(tokens.max())}, but the vocabulary has "
                f"{tokenizer.vocab_size} ids; the data is damaged: prepare it again"
            )
        return tokens
    if not path.is_file():
        raise GptkitError(
            f"perplexity data {str(path)!r} not found; pass a prepared data folder (its val shards are "
            "read) or a UTF-8 text file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GptkitError(f"{path} is not UTF-8 text; pass a text file or a prepared data folder") from None
    ids = np.array(tokenizer.encode(text), dtype=np.int64)
    return np.concatenate([head, ids])[:limit_tokens]
