"""GGUF export for llama.cpp's `gpt2` and `llama` architectures, written with the `gguf` package.

The layout is the one llama.cpp's own converter (`convert_hf_to_gguf.py`, class GPT2Model) writes:
tensor names `token_embd`, `position_embd`, `blk.N.{attn_norm,attn_qkv,attn_output,ffn_norm,ffn_up,
ffn_down}`, `output_norm`, with weights in nn.Linear's (out, in) order (the converter transposes HF's
Conv1D into exactly our layout), no `output` tensor (llama.cpp ties it to `token_embd`), and the
`gpt2.*` hyper-parameters plus a byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`, pre-tokenizer
`gpt-2`, tokens, token types, merges, end-of-text as BOS and EOS).

Types: `f32`; `f16` (matrices f16, vectors f32); `q8_0` (matrices whose rows divide into 32-value
blocks, else f16; vectors f32). The position table stays f32, as llama.cpp's converter keeps it.
A `bias=False` model gets zero biases (llama.cpp's gpt2 requires them; zeros change nothing).
The char tokenizer has no llama.cpp equivalent: exporting such a model is an error.

A model with Llama's switches (rmsnorm, swiglu, rope; no biases) is written for llama.cpp's `llama`
architecture as its converter writes `LlamaForCausalLM` (class LlamaModel): `blk.N.{attn_q,attn_k,
attn_v,attn_output,ffn_gate,ffn_up,ffn_down,attn_norm,ffn_norm}`, `output` unless the head is tied,
and `llama.*` hyper-parameters (kv heads, RMS epsilon, rope base and linear scaling). llama.cpp
rotates interleaved pairs (0, 1), (2, 3), ... where transformers and gptkit rotate the halves (i,
i + d/2): the rows of q and k are permuted within each head so that pair i lands at 2i, 2i + 1 (the
converter's `LlamaModel.permute`); a test holds llama.cpp's logits to ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.interop import check_gpt2, check_plain, require, staged_output
from gptkit.interop.hf import _merge_pairs, gpt2_vocab_merges, hf_tokenizer
from gptkit.model import GPT, LAYER_NORM_EPS
from gptkit.tokenizer import EOT, BPETokenizer, GPT2Tokenizer, Tokenizer
from gptkit.variants import is_llama

TYPES = ("f32", "f16", "q8_0")
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types
BLOCK_PARTS = {  # our name inside transformer.h.N -> llama.cpp's inside blk.N
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """llama.cpp's names -> fp32 arrays (padding rows cut, zero biases for bias=False)."""
    c = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd["transformer.wte.weight"][: c.vocab_size],
        "position_embd.weight": sd["transformer.wpe.weight"],
    }
    for i in range(c.n_layer):
        for ours, theirs in BLOCK_PARTS.items():
            weight = sd[f"transformer.h.{i}.{ours}.weight"]
            bias = sd.get(f"transformer.h.{i}.{ours}.bias")
            out[f"blk.{i}.{theirs}.weight"] = weight
            out[f"blk.{i}.{theirs}.bias"] = torch.zeros(weight.shape[0]) if bias is None else bias
    out["output_norm.weight"] = sd["transformer.ln_f.weight"]
    out["output_norm.bias"] = sd.get("transformer.ln_f.bias", torch.zeros(c.n_embd))
    return {k: v.contiguous().numpy() for k, v in out.items()}


def rope_permuted(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows from half-split RoPE order (i, i + d/2) to llama.cpp's interleaved (2i, 2i + 1)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def llama_gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """llama.cpp's `llama` names -> fp32 arrays: q and k permuted for its RoPE, [gate; up] split."""
    c = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["transformer.wte.weight"][: c.vocab_size]}
    kv = c.kv_heads * c.head_dim
    for i in range(c.n_layer):
        h = f"transformer.h.{i}"
        q, k, v = sd[f"{h}.attn.c_attn.weight"].split([c.n_embd, kv, kv])
        gate, up = sd[f"{h}.mlp.c_fc.weight"].chunk(2)
        out |= {
            f"blk.{i}.attn_norm.weight": sd[f"{h}.ln_1.weight"],
            f"blk.{i}.attn_q.weight": rope_permuted(q, c.n_head),
            f"blk.{i}.attn_k.weight": rope_permuted(k, c.kv_heads),
            f"blk.{i}.attn_v.weight": v,
            f"blk.{i}.attn_output.weight": sd[f"{h}.attn.c_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[f"{h}.ln_2.weight"],
            f"blk.{i}.ffn_gate.weight": gate,
            f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": sd[f"{h}.mlp.c_proj.weight"],
        }
    out["output_norm.weight"] = sd["transformer.ln_f.weight"]
    if not c.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"][: c.vocab_size]
    return {k: v.contiguous().numpy() for k, v in out.items()}


def _llama_metadata(writer: Any, gguf: Any, c: ModelConfig) -> None:
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(c.hidden)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    if c.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_factor)


def _gpt2_metadata(writer: Any, gguf: Any, c: ModelConfig) -> None:
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)


def gguf_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Tokens (byte-level spelling, by id), their llama.cpp types, and merges ("a b")."""
    if isinstance(tokenizer, GPT2Tokenizer):
        vocab, pairs = gpt2_vocab_merges()
    elif isinstance(tokenizer, BPETokenizer):
        hf = hf_tokenizer(tokenizer)
        vocab = hf.get_vocab(with_added_tokens=True)
        pairs = _merge_pairs(json.loads(hf.to_str())["model"]["merges"])
    else:
        raise GptkitError(
            f"GGUF cannot express the {tokenizer.kind} tokenizer: llama.cpp has no character-level "
            "tokenizer; prepare the data with gptkit prepare --tokenizer gpt2 (or bpe) and train on it "
            "to export to GGUF (ONNX and HF take a char model)"
        )
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(tokenizer.vocab_size)):
        raise GptkitError(f"the {tokenizer.kind} tokenizer's ids are not 0..{tokenizer.vocab_size - 1}")
    types = [TOKEN_CONTROL if t == EOT else TOKEN_NORMAL for t in tokens]
    return tokens, types, [f"{a} {b}" for a, b in pairs]


def export_gguf(
    model: GPT,
    tokenizer: Tokenizer,
    out: str | Path,
    *,
    type: str = "f16",
    name: str = "gptkit",
    force: bool = False,
) -> Path:
    """Write a GGUF file llama.cpp loads as a `gpt2` (or, with Llama's switches, `llama`) model;
    `type` is f32, f16 or q8_0."""
    check_plain(model, "GGUF")
    llama = is_llama(model.config)
    if llama and model.config.bias:
        raise GptkitError("GGUF export of a Llama-style model needs model.bias=false (llama.cpp's layout)")
    if not llama:
        check_gpt2(model, "GGUF")
    gguf = require("gguf", "GGUF export")
    if type not in TYPES:
        raise GptkitError(f"GGUF type must be one of {', '.join(TYPES)}, not {type!r}")
    tokens, token_types, merges = gguf_vocab(tokenizer)  # an unsupported tokenizer fails before writing
    c = model.config
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[type]
    with staged_output(out, force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama" if llama else "gpt2")
        writer.add_name(name)
        (_llama_metadata if llama else _gpt2_metadata)(writer, gguf, c)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_add_bos_token(False)
        for tensor_name, data in (llama_gguf_tensors if llama else gguf_tensors)(model).items():
            data, qtype = _encode(gguf, tensor_name, data, type)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)


def _encode(gguf: Any, name: str, data: np.ndarray, type: str) -> tuple[np.ndarray, Any]:
    """A tensor in the storage type its role and shape allow (see the module docstring)."""
    q = gguf.GGMLQuantizationType
    if type == "f32" or data.ndim == 1 or name == "position_embd.weight":
        return data, q.F32
    if type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return gguf.quants.quantize(data, q.Q8_0), q.Q8_0
    return data.astype(np.float16), q.F16
