"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p.

Each function takes logits of shape (B, V), one row per sequence, and returns new logits; the
filters set the tokens they drop to -inf, so softmax gives them probability 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptkit.generate.settings import SampleSettings


def penalize_repeats(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's rule (as in HF): a seen token's logit is divided by `penalty` if positive, else multiplied."""
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too)."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the nucleus: the most likely tokens, fewest first, until their probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already hold p (the first token is always kept)
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filtered_logits(logits: Tensor, settings: SampleSettings, seen: Tensor | None = None) -> Tensor:
    """The logits sampling draws from (temperature > 0): penalty, temperature, top-k, then top-p."""
    if seen is not None and settings.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, seen, settings.repetition_penalty)
    logits = logits / settings.temperature
    if settings.top_k is not None:
        logits = keep_top_k(logits, settings.top_k)
    return keep_top_p(logits, settings.top_p)


def choose_next(
    logits: Tensor, settings: SampleSettings, generator: torch.Generator, seen: Tensor | None = None
) -> Tensor:
    """Next token id of each row (B,): the argmax at temperature 0, else a draw from the filtered logits."""
    logits = logits.float()
    if settings.temperature == 0:
        if seen is not None and settings.repetition_penalty != 1.0:
            logits = penalize_repeats(logits, seen, settings.repetition_penalty)
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, settings, seen).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
