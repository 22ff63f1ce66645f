"""AdamW with GPT-2's weight-decay groups, and the learning-rate schedules.

Schedules are pure functions of the step, so resuming needs nothing but the step counter.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from gptkit.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and embeddings (2-D and up); never biases or LayerNorm gains (1-D).

    Decaying a gain pulls it towards zero, which shrinks activations rather than regularising.
    Only parameters that require grad are included (LoRA and prompt tuning freeze the rest).
    """
    decay, no_decay = [], []
    for p in model.parameters():  # a tied tensor is yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where the installed torch has a fused kernel for the device, else foreach."""
    kwargs: dict = {}
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu", "mps"):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        **kwargs,
    )


def learning_rate(step: int, config: TrainConfig) -> float:
    """The rate for optimiser step `step` (0-based) of `config.max_steps`.

    cosine: linear warm-up to lr, then half a cosine down to min_lr at the last step.
    constant: linear warm-up to lr, then lr.
    wsd (warm-up, stable, decay): warm-up, lr until the last `decay_fraction` of the steps, then a
    linear decay to min_lr; a run can be extended by restarting the decay from a stable checkpoint.
    """
    lr, min_lr, warmup, total = config.lr, config.min_lr, config.warmup_steps, config.max_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if config.schedule == "constant":
        return lr
    if config.schedule == "cosine":
        span = max(1, total - 1 - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    decay_start = max(warmup, total - round(config.decay_fraction * total))
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return lr + (min_lr - lr) * progress


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
