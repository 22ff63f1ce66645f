"""Activation checkpointing (`train.activation_checkpointing`): each block's activations are dropped
after the forward pass and recomputed in the backward pass, trading about a third more compute for
memory that no longer grows with the number of layers times the batch.

Applied to a plain model by the trainer, as torchtitan applies it, and without renaming a module:
each block's `forward` runs under `torch.utils.checkpoint` (non-reentrant, with the RNG state
restored, so dropout draws the same masks twice and the losses and gradients are those of the plain
model to rounding)."""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from gptkit.model import GPT


def recompute_blocks(model: GPT) -> None:
    """Make every block of `model` recompute its activations in the backward pass (in place)."""
    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
