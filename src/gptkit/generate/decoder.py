"""The decoder protocol: how the sampler advances every sequence by one token.

The sampler takes a `DecoderFor` (model, batch size -> decoder) as a parameter, so it does not know
which code computes a step: `GPT.forward` over the cache (`ForwardDecoder`, the default and the
reference), or gptkit's CPU kernel (`gptkit.generate.cpu.decode`), which
`gptkit.generate.inference` chooses for the models it prepares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from gptkit.model import GPT, KVCache


class Decoder(Protocol):
    def step(self, cache: KVCache, ids: Tensor) -> Tensor:
        """Feed `ids` (B,), one token per sequence, after the cached positions; logits (B, vocab)."""
        ...


DecoderFor = Callable[[GPT, int], Decoder]  # (model, number of sequences) -> the decoder for that batch


class ForwardDecoder:
    """A step through `GPT.forward` with the cache, on any device and in any precision."""

    def __init__(self, model: GPT) -> None:
        self.model = model

    def step(self, cache: KVCache, ids: Tensor) -> Tensor:
        return self.model(ids.to(self.model.device)[:, None], cache=cache)[:, -1]


def forward_decoder(model: GPT, batch_size: int) -> Decoder:
    """The default `DecoderFor`: GPT.forward, whatever the batch."""
    return ForwardDecoder(model)
