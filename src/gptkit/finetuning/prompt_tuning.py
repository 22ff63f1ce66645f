"""Prompt tuning (Lester et al., 2021): N trained vectors before every input, the model frozen.

`add_soft_prompt` turns a GPT into a `PromptTunedGPT`: the same modules, plus the vectors
(`soft_prompt`, N x n_embd), composed around the model's one forward path the way HF/peft compose
prompt tuning: the vectors go in through `inputs_embeds` before each sequence's first token, and
their positions are taken out of the output. The trainer, the sampler and evaluation call it like any
GPT (its `tokens_that_fit` leaves room for the vectors). Only N x n_embd numbers train: a few thousand.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gptkit.errors import GptkitError
from gptkit.model import GPT, KVCache, Layout
from gptkit.tokenizer import Tokenizer


class PromptTunedGPT(GPT):
    """A GPT whose every input starts with trained vectors; parameter names are the base's plus
    `soft_prompt`, as checkpoints have always stored them."""

    def __init__(self, base: GPT, prompt: Tensor) -> None:
        nn.Module.__init__(self)  # the base's modules as they are: nothing new to initialise
        self.config = base.config
        self.transformer = base.transformer
        self.rotary = base.rotary
        self.lm_head = base.lm_head
        self.soft_prompt = nn.Parameter(prompt)
        self.train(base.training)

    @property
    def n_prefix(self) -> int:  # type: ignore[override]
        return self.soft_prompt.size(0)

    def forward(
        self,
        idx: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        cache: KVCache | None = None,
        layout: Layout | None = None,
        last_only: bool = False,
        head: bool = True,
    ) -> Tensor:
        """`GPT.forward` with the vectors before the tokens (after left padding) when nothing is cached
        yet; the output has the tokens' positions only. With a filled cache the vectors are in it."""
        if cache is not None and cache.pos > 0:
            return super().forward(
                idx, inputs_embeds=inputs_embeds, cache=cache, layout=layout, last_only=last_only, head=head
            )
        if layout is not None:
            raise GptkitError(
                "a prompt-tuned model reads padded rows, not packed ones; set data.packing=false"
            )
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        pad = None if cache is None else cache.pad
        x = insert_prompt(x, self.soft_prompt, pad)
        x = super().forward(inputs_embeds=x, cache=cache, last_only=last_only, head=False)
        if not last_only:  # the last position is a token's already
            x = remove_prompt(x, self.n_prefix, pad)
        return self.lm_head(x) if head else x


def insert_prompt(x: Tensor, prompt: Tensor, pad: Tensor | None) -> Tensor:
    """Token embeddings x (B, T, C) with the soft prompt (P, C) before each sequence's first token:
    (B, P + T, C). With left padding the prompt goes after the padding, where the sequence starts."""
    B, T, C = x.shape
    P = prompt.size(0)
    prompt = prompt.to(x.dtype).expand(B, P, C)
    if pad is None:
        return torch.cat([prompt, x], dim=1)
    both = torch.cat([x, prompt], dim=1)  # tokens at 0 .. T-1, the prompt at T .. T+P-1
    j, p = torch.arange(T + P, device=x.device)[None], pad[:, None]
    source = torch.where(j < p, j, torch.where(j < p + P, T + j - p, j - P))
    return both.gather(1, source[..., None].expand(B, T + P, C))


def remove_prompt(x: Tensor, n_prompt: int, pad: Tensor | None) -> Tensor:
    """The positions of the tokens only, undoing `insert_prompt`'s layout: (B, T, C)."""
    if pad is None:
        return x[:, n_prompt:]
    B, T, C = x.size(0), x.size(1) - n_prompt, x.size(2)
    t = torch.arange(T, device=x.device)[None]
    where = torch.where(t < pad[:, None], t, t + n_prompt)
    return x.gather(1, where[..., None].expand(B, T, C))


def add_soft_prompt(
    model: GPT, n_tokens: int, init_text: str | None = None, tokenizer: Tokenizer | None = None
) -> PromptTunedGPT:
    """The model frozen, with `n_tokens` trainable prompt vectors (it shares the model's modules).

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
    return PromptTunedGPT(model, start)
