"""The pieces Llama-style models use in place of GPT-2's, for `gptkit.model` to compose.

- SwiGLU (Shazeer, 2020): a gated MLP, down(silu(gate(x)) * up(x)).
- Rotary position embedding, RoPE (Su et al., 2021): queries and keys rotated by an angle that grows
  with their position, so that attention scores depend on relative positions.

RMSNorm is torch's `nn.RMSNorm`. Each piece has the interface of the GPT-2 piece it replaces, so the
model picks one by its config switch and no forward pass asks which family it belongs to.
Conventions are Llama's as transformers implements it (RoPE rotates the two halves of each head, not
interleaved pairs), so HuggingFace weights load without permuting anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import ModelConfig

# The switches that make a model Llama's architecture (every other switch is free)
LLAMA_SWITCHES = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope"}


def is_llama(config: ModelConfig) -> bool:
    """Whether HF's `LlamaForCausalLM` (and peft on it, and llama.cpp's `llama`) expresses this model."""
    return all(getattr(config, key) == value for key, value in LLAMA_SWITCHES.items())


class SwiGLU(nn.Module):
    """Llama's MLP. `c_fc` computes the gate and the up projection in one product (rows [gate; up]:
    HF's `gate_proj` and `up_proj` stacked), `c_proj` is `down_proj`: the names GPT-2's MLP has, so
    LoRA, quantisation and the initialisation find the same layers in both."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Rotary(nn.Module):
    """cos and sin of each position's angles: `rotary(positions)` once per forward, for every layer.

    Dimension pair i of a head turns by position / theta^(2i / head_dim); linear scaling divides the
    position by `rope_factor` (a model stretched past the context it was trained with). Computed from
    the positions each time, in fp32: left-padded and packed sequences count their own positions.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim, self.theta, self.factor = config.head_dim, config.rope_theta, config.rope_factor

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (T,) or (B, T) -> cos, sin of shape (1 or B, 1, T, head_dim), to broadcast over heads.
        The frequencies are made here, in fp32, so that casting the model to bf16 cannot round them."""
        d = self.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d
        inv_freq = 1.0 / (self.theta**exponents * self.factor)
        angles = positions.to(torch.float32)[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        if angles.dim() == 2:
            angles = angles[None]
        return angles.cos()[:, None], angles.sin()[:, None]


def rotate(x: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
    """x (B, heads, T, head_dim) rotated: first half with second half, as transformers' Llama."""
    cos, sin = rotary
    half = x.size(-1) // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + turned * sin).to(x.dtype)
