"""HuggingFace `LlamaForCausalLM`: its config.json and weight names, both ways (`gptkit.interop.hf`
writes and reads the folder around them).

A gptkit model with Llama's switches (rmsnorm, swiglu, rope; any n_kv_head, tied or not, biases on
or off) is a `LlamaForCausalLM`. What differs from gptkit's layout:
- HF keeps `q_proj`, `k_proj`, `v_proj` apart; gptkit's `c_attn` stacks their rows [q; k; v]. Likewise
  `gate_proj` and `up_proj` are the rows [gate; up] of `mlp.c_fc`. Both are nn.Linear: nothing is
  transposed, and RoPE's half-rotation is transformers' own, so no rows are permuted.
- Embedding rows padded to `pad_vocab_multiple`: cut on export, zero rows added on import.
- config.json: the rotary settings are written in both layouts, transformers 4.x's (`rope_theta`,
  `rope_scaling`) and 5.x's (`rope_parameters`), and read from either.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.variants import LLAMA_SWITCHES

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)

# gptkit's name in block i -> HF's names in model.layers.i whose rows it stacks
STACKED = {
    "ln_1": ("input_layernorm",),
    "ln_2": ("post_attention_layernorm",),
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.c_proj": ("self_attn.o_proj",),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.c_proj": ("mlp.down_proj",),
}
IGNORED = ("rotary_emb.inv_freq",)  # a buffer older files carry


def llama_config(config: ModelConfig) -> dict[str, Any]:
    """The `LlamaConfig` fields of this model, the rotary ones in both transformers layouts."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = None
    if config.rope_scaling == "linear":
        scaling = {"type": "linear", "rope_type": "linear", "factor": config.rope_factor}
        rope = {"rope_type": "linear", "rope_theta": config.rope_theta, "factor": config.rope_factor}
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "rope_theta": config.rope_theta,  # transformers 4.x
        "rope_scaling": scaling,  # transformers 4.x
        "rope_parameters": rope,  # transformers 5.x
    }


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, str, float]:
    """(theta, scaling, factor) from either layout; 5.x's `rope_parameters` wins, as in transformers."""
    params = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    factor = float(params.get("factor", legacy.get("factor", 1.0)))
    if kind not in ("default", "linear"):
        raise GptkitError(
            f"{where} uses {kind!r} rope scaling; gptkit supports none (default) and linear rope scaling"
        )
    return theta, ("linear" if kind == "linear" else "none"), factor


def llama_fields(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields from a Llama config.json; what gptkit cannot express is a one-line error."""
    n_embd, n_head = cfg.get("hidden_size", 4096), cfg.get("num_attention_heads", 32)
    bad = []
    if cfg.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={cfg.get('hidden_act')!r} (gptkit's SwiGLU uses 'silu')")
    if cfg.get("head_dim") not in (None, n_embd // n_head):
        bad.append(f"head_dim={cfg.get('head_dim')} (gptkit's is hidden_size / num_attention_heads)")
    if bool(cfg.get("attention_bias", False)) != bool(cfg.get("mlp_bias", False)):
        bad.append("attention_bias != mlp_bias (gptkit's bias switch covers both)")
    if bad:
        raise GptkitError(f"{where} is a Llama variant gptkit cannot express: {'; '.join(bad)}")
    theta, scaling, factor = _rope(cfg, where)
    block_size = cfg.get("max_position_embeddings", 2048)
    fields = dict(
        LLAMA_SWITCHES,
        n_layer=cfg.get("num_hidden_layers", 32),
        n_head=n_head,
        n_kv_head=cfg.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        mlp_hidden=cfg.get("intermediate_size", 11008),
        block_size=block_size,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        bias=bool(cfg.get("attention_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=theta,
        dropout=0.0,
    )
    if scaling == "linear":
        original = math.ceil(block_size / factor)
        fields |= dict(rope_scaling="linear", rope_factor=factor, rope_original_block_size=original)
    return fields


def to_llama_state(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """gptkit's state dict -> `LlamaForCausalLM` tensors (fp32, contiguous, no shared storage)."""
    v = config.vocab_size
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"][:v]}
    out["model.norm.weight"] = state["transformer.ln_f.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][:v]
    sizes = {
        "attn.c_attn": [config.n_embd, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim],
        "mlp.c_fc": [config.hidden, config.hidden],
    }
    for i in range(config.n_layer):
        for ours, theirs in STACKED.items():
            for kind in ("weight", "bias"):
                tensor = state.get(f"transformer.h.{i}.{ours}.{kind}")
                if tensor is None:
                    continue
                parts = tensor.split(sizes[ours]) if ours in sizes else (tensor,)
                for name, part in zip(theirs, parts, strict=True):
                    out[f"model.layers.{i}.{name}.{kind}"] = part
    return {k: t.detach().to("cpu", torch.float32).contiguous().clone() for k, t in out.items()}


def from_llama_state(state: dict[str, Tensor], config: ModelConfig, source: str) -> dict[str, Tensor]:
    """`LlamaForCausalLM` tensors -> a state dict for `GPT(config)` (embeddings padded); tensors
    left over are returned under their HF names, so that the caller's key check names them."""
    state = {k: t for k, t in state.items() if not k.endswith(IGNORED)}
    wte = state.pop("model.embed_tokens.weight", None)
    if wte is None:
        raise GptkitError(f"{source} has no token embedding (model.embed_tokens.weight); it is not a Llama")
    out = {"transformer.wte.weight": _padded(wte, config)}
    if "model.norm.weight" in state:
        out["transformer.ln_f.weight"] = state.pop("model.norm.weight")
    head = state.pop("lm_head.weight", None)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    elif head is None:
        raise GptkitError(
            f"{source} has no lm_head.weight although its config.json says tie_word_embeddings=false"
        )
    else:
        out["lm_head.weight"] = _padded(head, config)
    for i in range(config.n_layer):
        for ours, theirs in STACKED.items():
            for kind in ("weight", "bias"):
                names = [f"model.layers.{i}.{name}.{kind}" for name in theirs]
                if all(n in state for n in names):
                    out[f"transformer.h.{i}.{ours}.{kind}"] = torch.cat([state.pop(n) for n in names])
    out |= state  # what no rule took: reported as unexpected
    return {k: t.to(torch.float32).contiguous() for k, t in out.items()}


def _padded(weight: Tensor, config: ModelConfig) -> Tensor:
    padded = torch.zeros(config.padded_vocab_size, weight.size(1))
    padded[: weight.size(0)] = weight
    return padded
