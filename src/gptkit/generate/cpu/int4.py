"""The int4 weight layout gptkit's CPU kernel reads (`kernels.c`): packing a matrix, and reading it back.

A row of n weights is cut into groups of `group` inputs (a power of two, at least INT4_BLOCK), each
with a bf16 scale and zero: weight = q * scale + zero for its 4-bit code q (0..15). Asymmetric
(min to max), because a group's weights are rarely centred on zero. The codes are packed two per
byte in blocks of INT4_BLOCK weights: byte j of a block holds weight j in its low 4 bits and weight
j + 16 in its high 4 bits, so one 16-byte load gives two vectors of 16 weights in order. A row
ends padded to a whole block (any width works; the kernel reads the last part one weight at a time).

q * scale is exact in fp32 (4 bits times bf16's 8), so `dequantize` here and the kernel compute the
same weights bit for bit. Where the kernel has AVX512-VNNI it also quantises the activations, to int8
per ACTIVATION_BLOCK inputs (`quantize_activations`, the same rounding): its products are then
F.linear's of the dequantised activations and weights, up to the order of the sums; elsewhere the
activations stay fp32 and the products are F.linear's of x and the dequantised weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gptkit.errors import GptkitError

INT4_BLOCK = 32  # weights per 16 bytes; kernels.c defines the same (a test reads it there)
ACTIVATION_BLOCK = 64  # inputs per int8 scale of the activations (kernels.c's XCHUNK, where it has VNNI)


def check_group(group: int) -> None:
    """A one-line error unless `group` is a power of two of at least INT4_BLOCK (the kernel shifts by it)."""
    if group < INT4_BLOCK or group & (group - 1):
        raise GptkitError(f"int4 group size must be a power of two of at least {INT4_BLOCK}, not {group}")


def _round_bf16(t: Tensor, toward: float) -> Tensor:
    """`t` as bf16, rounded toward -inf or +inf (`toward`), so the group's range stays inside the codes'."""
    b = t.to(torch.bfloat16)
    off = b.float() > t if toward < 0 else b.float() < t
    return torch.where(off, torch.nextafter(b, torch.full_like(b, toward)), b)


def pack(weight: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """(codes, scales) for `weight` (out, n): uint8 (out, 16 * ceil(n / 32)) and bf16 (out, groups, 2)
    holding each group's (scale, zero). Every weight is within half a scale of what it is stored as."""
    check_group(group)
    w = weight.detach().float()
    out, n = w.shape
    groups = -(-n // group)
    # a last partial group is filled with copies of the row's last weight: its range stays its own
    filled = torch.cat([w, w[:, -1:].expand(out, groups * group - n)], dim=1).view(out, groups, group)
    zero = _round_bf16(filled.amin(-1), float("-inf"))
    span = filled.amax(-1) - zero.float()
    scale = _round_bf16((span / 15).clamp(min=torch.finfo(torch.float32).tiny), float("inf"))
    q = ((filled - zero.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15)
    blocks = -(-n // INT4_BLOCK)
    q = F.pad(q.view(out, -1)[:, :n].to(torch.uint8), (0, blocks * INT4_BLOCK - n)).view(out, blocks, 2, 16)
    codes = (q[:, :, 0] | (q[:, :, 1] << 4)).view(out, blocks * 16)
    return codes.contiguous(), torch.stack([scale, zero], dim=-1).contiguous()


def dequantize(codes: Tensor, scales: Tensor, n: int, group: int) -> Tensor:
    """The fp32 weights (out, n) that `codes` and `scales` (from `pack`) stand for."""
    out, groups = scales.shape[:2]
    blocks = codes.view(out, -1, INT4_BLOCK // 2)
    q = torch.stack([blocks & 15, blocks >> 4], dim=2).view(out, -1)
    q = F.pad(q, (0, groups * group - q.size(1))).view(out, groups, group)
    s = scales.float()
    return (q * s[..., :1] + s[..., 1:]).view(out, -1)[:, :n]


def quantize_activations(x: Tensor, block: int = ACTIVATION_BLOCK) -> Tensor:
    """x (m, n) as the kernel's int8 products see it: each row's blocks of `block` inputs rounded to
    steps of their largest size / 127 (x * (127 / largest), to nearest even, in fp32), dequantised."""
    m, n = x.shape
    blocks = -(-n // block)
    padded = F.pad(x.float(), (0, blocks * block - n)).view(m, blocks, block)
    largest = padded.abs().amax(-1, keepdim=True)
    inverse = torch.where(largest > 0, 127 / largest, torch.zeros_like(largest))
    q = (padded * inverse).round_()
    return (q * (largest / 127)).view(m, -1)[:, :n]
