"""The training loss fused with the output layer: cross-entropy without keeping the logits.

For a small GPT the logits (tokens x vocabulary) are the largest tensor of a training step. Computing
them a chunk at a time and turning each chunk straight into its gradient saves that memory and the
dtype copies around it: measured 14% off an fp32 step of the small benchmark model
(bench/train_throughput.py). `next_token_loss` uses it while training: the model gives its hidden
states (`head=False`) and the loss applies the head, outside the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.model import GPT, Layout

IGNORE_INDEX = -100  # targets with this value are left out of the loss (F.cross_entropy's default)
LOSS_CHUNK_ELEMENTS = 2**27  # logits of at most this many entries exist at a time (512 MiB fp32)


def next_token_loss(
    model: GPT,
    ids: Tensor,
    targets: Tensor,
    layout: Layout | None = None,
    *,
    step: nn.Module | None = None,
    divisor: float | None = None,
) -> Tensor:
    """Cross-entropy of the model's next-token predictions for `ids` against `targets` (B, T): the mean
    over the targets that count (not IGNORE_INDEX), or with `divisor` their sum / divisor.

    A training step gives all its micro-batches one divisor (the step's count of targets), so that
    every target weighs the same whatever the micro-batch it falls in; evaluation takes the mean.
    Where gradients flow, the loss is fused with the head (`linear_cross_entropy`: no logits kept,
    the same loss, a faster step); otherwise (evaluation, a frozen or quantised model) it is the plain
    cross-entropy of the logits. `step` runs the forward pass: the model as the training step wraps
    it (DDP, FSDP, torch.compile), by default the model itself.
    """
    step = model if step is None else step
    x = step(ids, layout=layout, head=False)
    if torch.is_grad_enabled() and x.requires_grad:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            return linear_cross_entropy(
                x.flatten(0, 1),
                model.lm_head.weight,
                targets.flatten(),
                model.config.vocab_size,
                dtype,
                divisor,
            )
    logits = model.lm_head(x)
    # upcast: cross-entropy of fp16/bf16 logits loses precision (a no-op for fp32)
    flat = logits.float().flatten(0, 1)
    if divisor is None:
        return F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / divisor


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    vocab_size: int,
    dtype: torch.dtype,
    divisor: float | None = None,
) -> Tensor:
    """Cross-entropy of `x (N, C) @ weight[:vocab_size].T` against `targets (N,)`: the mean over the
    targets that count, or their sum / `divisor`."""
    return LinearCrossEntropy.apply(x, weight, targets, vocab_size, dtype, LOSS_CHUNK_ELEMENTS, divisor)


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of the logits `x @ weight[:vocab_size].T`, with its gradient found in forward.

    The same numbers as `F.cross_entropy(F.linear(x, weight[:vocab_size]), targets)`, but cheaper in
    training: the logits (N x vocab, the largest tensor of a small GPT) are made a chunk of rows at a
    time and turned in place into their gradient, softmax - one_hot, right away, so nothing of that
    size is kept for backward or copied between dtypes more than once. Backward only scales the two
    gradients by the incoming one. `dtype` is the matmul precision (bf16 under autocast); the softmax
    is computed in fp32 as with autocast. The gradient of padding rows (>= vocab_size) is zero.
    The result is the mean over the targets that count, or their sum / `divisor` when one is given.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        targets: Tensor,
        vocab_size: int,
        dtype: torch.dtype,
        chunk_elements: int,
        divisor: float | None = None,
    ) -> Tensor:
        n = x.size(0)
        w = weight[:vocab_size].to(dtype)  # a contiguous view in fp32; the copy autocast would make in bf16
        valid = (targets != IGNORE_INDEX).unsqueeze(1)
        safe = targets.unsqueeze(1).masked_fill(~valid, 0)
        xd = (x * valid).to(dtype)  # ignored rows zeroed: they add nothing to the weight's gradient
        grad_x = torch.empty_like(xd)
        grad_w = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
        grad_w[vocab_size:].zero_()
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        rows = max(1, chunk_elements // vocab_size)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            logp = torch.log_softmax(xd[s:e] @ w.T, dim=1, dtype=torch.float32)
            logp_t = logp.gather(1, safe[s:e])
            total -= (logp_t * valid[s:e]).sum()
            if dtype == torch.float32:
                grad = logp.exp_()  # softmax, in place
            else:
                grad = torch.exp(logp, out=torch.empty(logp.shape, device=x.device, dtype=dtype))
            del logp
            grad.scatter_(1, safe[s:e], torch.expm1(logp_t).to(dtype))  # p - 1 at the target, precisely
            torch.mm(grad, w, out=grad_x[s:e])
            if s == 0 and grad_w.dtype == dtype:
                torch.mm(grad.T, xd[s:e], out=grad_w[:vocab_size])
            elif s == 0:
                grad_w[:vocab_size].copy_(grad.T @ xd[s:e])
            else:
                grad_w[:vocab_size] += grad.T @ xd[s:e]
        count = valid.sum() if divisor is None else divisor
        # Kept as attributes, not saved tensors: backward scales them in place and lets them go.
        ctx.grads = (grad_x.mul_(valid), grad_w, count, x.dtype)
        return total / count

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("the fused loss can be differentiated once (retain_graph is not supported)")
        grad_x, grad_w, count, x_dtype = ctx.grads
        ctx.grads = None
        scale = grad_loss / count
        return grad_x.to(x_dtype).mul_(scale), grad_w.mul_(scale), None, None, None, None, None
