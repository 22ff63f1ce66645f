"""Prompt tuning (Lester et al., 2021): N trained vectors before every input, the model frozen.

The vectors live in `GPT.soft_prompt` (N x n_embd); `GPT.forward` inserts them before the first
token of each sequence, so the trainer, the sampler and evaluation use a prompt-tuned model like any
other. Only N x n_embd numbers train: a few thousand.
"""

from __future__ import annotations

import torch
from torch import nn

from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer


def add_soft_prompt(
    model: GPT, n_tokens: int, init_text: str | None = None, tokenizer: Tokenizer | None = None
) -> None:
    """Freeze the model and give it `n_tokens` trainable prompt vectors.

    They start as the embeddings of `init_text`'s tokens (repeated or cut to n_tokens), which
    trains faster than random vectors; without a text, as embeddings of random vocabulary tokens.
    """
    if n_tokens >= model.config.block_size:
        raise GptkitError(
            f"finetune.prompt_tokens ({n_tokens}) must be smaller than the model's context "
            f"({model.config.block_size})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    if init_text:
        if tokenizer is None:
            raise GptkitError("finetune.prompt_init needs the base model's tokenizer")
        ids = tokenizer.encode(init_text)
        ids = (ids * (n_tokens // len(ids) + 1))[:n_tokens]
    else:
        ids = torch.randint(0, model.config.vocab_size, (n_tokens,)).tolist()
    with torch.no_grad():
        start = model.transformer.wte.weight[torch.tensor(ids, device=model.device)].clone()
    model.soft_prompt = nn.Parameter(start)
