"""Choosing the next token from logits: penalties, temperature, top-k, top-p, and the draw itself.

Each function takes logits of shape (B, V), one row per sequence, and returns new logits; the
filters set the tokens they drop to -inf, so softmax gives them probability 0. The draw takes one
uniform number per row (`draws`) from that row's own generator, so a sequence's tokens depend on its
seed and its logits only, never on the other sequences that share its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptkit.generate.settings import SampleSettings


def penalize_repeats(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's rule (as in HF): a seen token's logit is divided by `penalty` if positive, else multiplied."""
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def penalize_counts(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's additive penalties: logit - presence * (count > 0) - frequency * count, where count is
    how often each token was generated so far (the prompt does not count)."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


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


def penalized(
    logits: Tensor, settings: SampleSettings, seen: Tensor | None = None, counts: Tensor | None = None
) -> Tensor:
    """The logits after the penalties `settings` asks for: repetition (`seen`: (B, V) tokens of the
    prompt and the output), then presence and frequency (`counts`: (B, V) generated tokens)."""
    if seen is not None and settings.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, seen, settings.repetition_penalty)
    if counts is not None and (settings.presence_penalty or settings.frequency_penalty):
        logits = penalize_counts(logits, counts, settings.presence_penalty, settings.frequency_penalty)
    return logits


def filtered_logits(logits: Tensor, settings: SampleSettings) -> Tensor:
    """The logits sampling draws from (temperature > 0): temperature, top-k, then top-p."""
    logits = logits / settings.temperature
    if settings.top_k is not None:
        logits = keep_top_k(logits, settings.top_k)
    return keep_top_p(logits, settings.top_p)


def draw(probs: Tensor, draws: Tensor) -> Tensor:
    """The token of each row (B, V) at quantile `draws[b]` (uniform in [0, 1)) of its distribution:
    inverse-CDF sampling, one number per row. A token of probability 0 is never chosen."""
    cdf = probs.double().cumsum(dim=-1)
    target = draws.to(cdf)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.size(-1) - 1)
    # rounding can land past the last token of positive probability: take the most likely one there
    impossible = probs.gather(1, ids[:, None]).squeeze(1) == 0
    return torch.where(impossible, probs.argmax(dim=-1), ids)


def choose_next(
    logits: Tensor,
    settings: SampleSettings,
    draws: Tensor | None = None,
    seen: Tensor | None = None,
    counts: Tensor | None = None,
) -> Tensor:
    """Next token id of each row (B,): the argmax at temperature 0, else the token at `draws` of the
    filtered distribution (every row with the same settings; penalties as `penalized`)."""
    logits = penalized(logits.float(), settings, seen, counts)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    if draws is None:
        raise ValueError("sampling at temperature > 0 needs one uniform draw per row")
    return draw(filtered_logits(logits, settings).softmax(dim=-1), draws)


def log_probabilities(logits: Tensor, ids: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """What OpenAI's `logprobs` reports, from the model's raw logits (B, V) (no penalty, temperature
    or filter): the log-probability of each chosen id (B,), and the `top` most likely ids (B, top)
    with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top, dim=-1)
    return logp.gather(1, ids[:, None]).squeeze(1), best.indices, best.values
