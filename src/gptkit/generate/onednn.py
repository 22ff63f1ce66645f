"""Faster fp32 inference on CPUs: the model's linear layers run through oneDNN instead of aten.

Decoding one token reads every weight once for a matrix-vector product, so its speed is set by how
close that product comes to the memory bandwidth. Measured on this project's CPU (2 threads, GPT-2
124M's 48 block matrices then its 50257 x 768 head, weights far larger than the caches): aten's
`F.linear` (MKL's sgemv) reads 15-16 GB/s, oneDNN's linear 25-27 GB/s on the blocks and 32-36 GB/s on
the head, a plain `sum` 39 GB/s. With a prompt (32 tokens) oneDNN is faster too. The results are
fp32 matrix products in another summation order: they agree with `F.linear` to rounding
(about 1e-6 relative).

`use_onednn(model)` swaps the layers in place for inference (`gptkit.load` does it on CPUs that
have oneDNN); with gradients enabled each layer falls back to `F.linear`, so nothing about training
changes. The output layer keeps sharing its weight with the token embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.model import GPT


def available() -> bool:
    """oneDNN's fused linear op is built into this torch (x86 and most ARM builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Module):
    """y = x @ weight.T + bias through oneDNN for fp32 inputs without gradients, else F.linear."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = (
            weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        )
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def use_onednn(model: GPT) -> int:
    """Replace the linear layers of a CPU fp32 model (and its output layer) in place; returns how many.

    Does nothing where oneDNN is missing or the model is not an fp32 model on the CPU.
    """
    if not available() or model.device.type != "cpu" or model.dtype != torch.float32:
        return 0
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child is not model.lm_head:
                setattr(module, name, OneDNNLinear(child.weight, child.bias))
                n += 1
    if type(model.lm_head) is nn.Linear:  # the head scores the real vocabulary: a view of those rows
        model.lm_head = OneDNNLinear(model.lm_head.weight[: model.config.vocab_size], None)
        n += 1
    return n
