"""ONNX export: two graphs with dynamic batch and sequence axes, for onnxruntime and friends.

- `OUT.onnx` (prefill): `input_ids` (batch, seq) -> `logits` (batch, seq, vocab) and the keys and
  values of every layer, `present.N.key` / `present.N.value` (batch, n_kv_head, seq, head_dim).
- `OUT_with_past.onnx` (decoding): `input_ids` plus `past_key_values.N.key` / `.value` (batch,
  n_head, past, head_dim) -> `logits` and `present.N.*` of past + seq positions. Feed each step's
  presents back as the next step's past (the names follow HF Optimum's GPT-2 graphs).

The graphs come from `_Graph`, a re-statement of `GPT.forward` over explicit key/value tensors (our
`KVCache` is a Python object with in-place writes, which an exported graph cannot hold). Positions
count from the past length; there is no padding input, so a batch holds prompts of equal length.
Every switch is expressed: the model's own norms and MLP modules, RoPE (`gptkit.variants`), and
grouped-query attention, whose key/value heads are stored once and repeated for their query heads.
The logits cover the real vocabulary only (padding rows cut), as `GPT.forward` returns them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.errors import GptkitError
from gptkit.interop import check_plain, require, staged_output
from gptkit.model import GPT
from gptkit.variants import rotate

OPSET = 18
PROTOBUF_LIMIT = 2**31 - 2**26  # bytes of weights a single .onnx file can hold, with room for the graph


class _Graph(nn.Module):
    """GPT.forward with keys/values as plain tensors: (input_ids, *past) -> (logits, *present)."""

    def __init__(self, model: GPT, with_past: bool) -> None:
        super().__init__()
        self.model = model
        self.with_past = with_past

    def forward(self, idx: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        m, c = self.model, self.model.config
        B, T = idx.shape
        C, head_dim, group = c.n_embd, c.head_dim, c.n_head // c.kv_heads
        past_len = past[0].shape[2] if self.with_past else 0
        positions = torch.arange(T, device=idx.device) + past_len
        rotary = None if m.rotary is None else m.rotary(positions)
        x = m.transformer.wte(idx)
        if rotary is None:
            x = x + m.transformer.wpe(positions)
        # query i (absolute position past_len + i) sees keys 0 .. past_len + i
        keys = torch.arange(T + past_len, device=idx.device)
        mask = keys[None, :] <= positions[:, None]
        presents: list[Tensor] = []
        for i, block in enumerate(m.transformer.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(block.attn.split, dim=2)
            q, k, v = (t.reshape(B, T, -1, head_dim).transpose(1, 2) for t in (q, k, v))
            if rotary is not None:
                q, k = rotate(q, rotary), rotate(k, rotary)
            if self.with_past:
                k = torch.cat([past[2 * i], k], dim=2)
                v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # GQA
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
            att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, C)
            x = x + block.attn.c_proj(y)
            x = x + block.mlp(block.ln_2(x))
        x = m.transformer.ln_f(x)
        logits = m.lm_head(x)
        return (logits, *presents)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per torchvision op it skips and warns about internals: none concern us."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _names(n_layer: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def with_past_path(out: str | Path) -> Path:
    """Where the decoding graph of `out` goes: `model.onnx` -> `model_with_past.onnx`."""
    out = Path(out)
    return out.with_name(f"{out.stem}_with_past{out.suffix or '.onnx'}")


def export_onnx(model: GPT, out: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write the prefill graph to `out` and the decoding graph beside it; returns both paths."""
    check_plain(model, "ONNX")
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    out = Path(out)
    if out.suffix != ".onnx":
        raise GptkitError(f"ONNX output {str(out)!r} should end in .onnx; e.g. model.onnx")
    model = model.to("cpu", torch.float32).eval()
    c = model.config
    if model.num_params() * 4 >= PROTOBUF_LIMIT:
        raise GptkitError(
            f"ONNX export of {model.num_params():,} fp32 parameters exceeds ONNX's 2 GB single-file limit; "
            "gptkit writes single-file graphs only: export to hf or gguf instead"
        )
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=c.block_size)
    past = torch.export.Dim("past", min=1, max=c.block_size)
    idx = torch.zeros(2, 3, dtype=torch.long)
    kv = [torch.zeros(2, c.kv_heads, 4, c.head_dim) for _ in range(2 * c.n_layer)]
    present = _names(c.n_layer, "present")
    second = with_past_path(out)
    for path in (out, second):  # check both before writing either
        if path.exists() and not force:
            raise GptkitError(f"{str(path)!r} already exists; choose another output path or pass --force")
    jobs = [
        (out, _Graph(model, False), (idx,), ["input_ids"], {"idx": {0: batch, 1: seq}}),
        (
            second,
            _Graph(model, True),
            (idx, *kv),
            ["input_ids", *_names(c.n_layer, "past_key_values")],
            {"idx": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in kv)},
        ),
    ]
    for path, graph, args, inputs, shapes in jobs:
        with staged_output(path, force) as tmp, _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                graph,
                args,
                dynamic_shapes=shapes,
                input_names=inputs,
                output_names=["logits", *present],
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            program.save(str(tmp))
    return out, second
