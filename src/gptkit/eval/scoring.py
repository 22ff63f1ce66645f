"""Log-likelihood of continuations given contexts, batched over full (KV-free) forward passes.

Tokenisation and truncation follow lm-evaluation-harness (`HFLM._encode_pair`,
`_loglikelihood_tokens`), which is what makes our accuracies equal to the harness's:

  * trailing spaces of the context move to the start of the continuation;
  * context + continuation is encoded as one string, the context alone is encoded, and the
    continuation's tokens are those of the whole past the context's length;
  * an empty context becomes the end-of-text token;
  * the model reads (context + continuation)[-(block_size + 1):][:-1], and the continuation's
    tokens are scored from the last len(continuation) positions of that input.

Sequences of a batch are padded on the right. A causal model's outputs at a position depend only
on earlier positions, so padding after a sequence cannot change its scores.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from gptkit.config import EVAL_BATCH_SIZE
from gptkit.errors import GptkitError
from gptkit.tokenizer import Tokenizer

NO_PROGRESS_ENV = "GPTKIT_NO_PROGRESS"


@dataclass(frozen=True)
class Score:
    """log P(continuation | context) summed over its tokens; `greedy`: argmax decoding gives it."""

    logprob: float
    greedy: bool
    tokens: int


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split the harness's way (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def logits_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """A GPT (or a wrapper of one: DDP, FSDP, compiled) as ids (B, T) → logits (B, T, V)."""
    return lambda idx: model(idx)


def show_progress(progress: bool) -> bool:
    return progress and os.environ.get(NO_PROGRESS_ENV, "") not in ("1", "true")


@torch.no_grad()
def score_tokens(
    forward: Callable[[Tensor], Tensor],
    pairs: Sequence[tuple[list[int], list[int]]],
    block_size: int,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = False,
    desc: str = "scoring",
) -> list[Score]:
    """Scores of token-id (context, continuation) pairs, in the order given.

    Longest first (as the harness does): batches hold similar lengths, so little padding is computed,
    and the first batch shows at once whether the largest fits in memory.
    """
    inputs: list[tuple[list[int], int]] = []
    for i, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise GptkitError(
                f"continuation {i} has no tokens of its own once tokenized with its context; "
                "start continuations with a space or another word boundary"
            )
        ids = (context + continuation)[-(block_size + 1) :][:-1]
        inputs.append((ids, min(len(continuation), len(ids))))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    scores: list[Score | None] = [None] * len(inputs)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress(progress), leave=False):
        batch = order[start : start + batch_size]
        width = len(inputs[batch[0]][0])
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids = inputs[i][0]
            idx[row, : len(ids)] = torch.tensor(ids)
        logits = forward(idx.to(device))
        for row, i in enumerate(batch):
            ids, n = inputs[i]
            end = len(ids)
            logprobs = F.log_softmax(logits[row, end - n : end].float(), dim=-1)
            target = torch.tensor(pairs[i][1][-n:], device=logprobs.device)
            picked = logprobs.gather(1, target[:, None]).squeeze(1)
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            scores[i] = Score(float(picked.double().sum()), greedy, n)
    return [s for s in scores if s is not None]


def score_requests(
    forward: Callable[[Tensor], Tensor],
    tokenizer: Tokenizer,
    requests: Sequence[tuple[str, str]],
    block_size: int,
    **kwargs: object,
) -> list[Score]:
    """Scores of (context, continuation) strings; keywords as in `score_tokens`."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    return score_tokens(forward, pairs, block_size, **kwargs)  # type: ignore[arg-type]
