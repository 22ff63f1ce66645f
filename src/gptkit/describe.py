"""`gptkit info`: what a preset, config file, prepared data, run, checkpoint or adapter holds.

A preset, a config and prepared data are described without torch (shapes are counted from the
config), so that `gptkit info gpt2` answers at once; runs and checkpoints load through torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import yaml

from gptkit.config import (
    GPT2_VOCAB_SIZE,
    MODEL_PRESETS,
    ModelConfig,
    RunConfig,
    did_you_mean,
    load_config,
    validate,
)
from gptkit.data.shards import PreparedData
from gptkit.data.streams import stream_tokenizer
from gptkit.errors import GptkitError
from gptkit.layout import CHECKPOINT_FOLDER, CONFIG_FILE
from gptkit.tokenizer import from_description

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def describe(target: str, verify: bool = False) -> dict[str, Any]:
    path = Path(target)
    if target in MODEL_PRESETS and not path.exists():
        own_vocab = MODEL_PRESETS[target].get("vocab_size")  # a published model's own tokenizer
        config = ModelConfig(preset=target, vocab_size=own_vocab or GPT2_VOCAB_SIZE)
        tokenizer = {"type": "the model's own (gptkit import hf)" if own_vocab else "gpt2"}
        return {"kind": "preset", "name": target, **_model_info(config), "tokenizer": tokenizer}
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _config_info(path)
    if path.is_file():
        return _checkpoint_info(path)
    if path.is_dir() and (path / "meta.json").is_file():
        return _data_info(path, verify)
    if path.is_dir() and all((path / name).is_file() for name in ADAPTER_FILES):
        return _adapter_info(path)
    if path.is_dir() and (path / CHECKPOINT_FOLDER).is_dir():
        return _run_info(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_info(path)
    if path.exists():
        raise GptkitError(
            f"{target!r} is neither a run, a checkpoint, an adapter, prepared data nor a config file"
        )
    presets = ", ".join(MODEL_PRESETS)
    hint = did_you_mean(target, MODEL_PRESETS)
    raise GptkitError(
        f"{target!r} not found{hint}; pass a preset ({presets}), a run, a checkpoint or a config"
    )


def _family(m: dict[str, Any]) -> str:
    """ "GPT-2", or the switches that differ from it: "Llama-style (rmsnorm, swiglu 352, rope theta
    10000, 2 kv heads, untied)". Older checkpoints' configs have no switches: GPT-2."""
    parts = []
    if m.get("norm", "layernorm") != "layernorm":
        parts.append(m["norm"])
    if m.get("mlp", "gelu") != "gelu":
        parts.append(f"{m['mlp']} {m.get('mlp_hidden') or 'auto'}")
    if m.get("position", "learned") != "learned":
        scaled = f" x{m['rope_factor']:g} linear" if m.get("rope_scaling") == "linear" else ""
        parts.append(f"rope theta {m['rope_theta']:g}{scaled}")
    if m.get("n_kv_head") not in (None, m["n_head"]):
        parts.append(f"{m['n_kv_head']} kv heads")
    if not m.get("tie_embeddings", True):
        parts.append("untied")
    if not parts:
        return "GPT-2"
    llama = {m.get("norm"), m.get("mlp"), m.get("position")} == {"rmsnorm", "swiglu", "rope"}
    return f"{'Llama-style' if llama else 'GPT-2 with'} ({', '.join(parts)})"


def _model_info(config: ModelConfig) -> dict[str, Any]:
    return {
        "model": config.model_dump(mode="json") | {"padded_vocab_size": config.padded_vocab_size},
        "params": config.num_params(),
        "params_without_position": config.num_params(include_position=False),
    }


def _config_info(path: Path) -> dict[str, Any]:
    """The model the config trains: for a fine-tune, the base's (its shape and tokenizer are used)."""
    config = load_config(path)
    if config.finetune.base is not None:
        return _finetune_config_info(path, config)
    model = config.model
    tokenizer: dict[str, Any] = {"type": "gpt2"}
    if model.vocab_size is None and config.data.stream:  # the streamed sources' one tokenizer
        streamed = stream_tokenizer(config.data)
        model = model.model_copy(update={"vocab_size": streamed.vocab_size})
        tokenizer = _tokenizer_summary(streamed.description)
    elif model.vocab_size is None:
        try:
            data = PreparedData.open(config.data.path)
            model = model.model_copy(update={"vocab_size": data.vocab_size})
            tokenizer = _tokenizer_summary(data.meta["tokenizer"])
        except GptkitError:
            model = model.model_copy(update={"vocab_size": GPT2_VOCAB_SIZE})
            tokenizer = {
                "type": f"gpt2 assumed ({config.data.path} is not prepared yet: its vocabulary decides)"
            }
    return {"kind": "config", "name": str(path), **_model_info(model), "tokenizer": tokenizer}


def _finetune_config_info(path: Path, config: RunConfig) -> dict[str, Any]:
    base = str(config.finetune.base)
    out: dict[str, Any] = {"kind": "config", "name": str(path), "finetune": _finetune_summary(config)}
    if not Path(base).exists():
        out["finetune"]["base_missing"] = True
        return out
    described = describe(base)
    keep = ("model", "params", "params_without_position", "tokenizer")
    return out | {k: described[k] for k in keep if k in described}


def _finetune_summary(config: RunConfig) -> dict[str, Any]:
    fc, data = config.finetune, config.data
    out: dict[str, Any] = {"method": fc.method, "base": fc.base}
    if fc.method == "lora":
        out["lora"] = fc.lora.model_dump(mode="json")
    if fc.method == "prompt":
        out["prompt_tokens"] = fc.prompt_tokens
    if data.instructions is not None:
        out |= {"instructions": data.instructions, "template": data.template}
    else:
        out["data"] = data.path
    return out


def _tokenizer_summary(description: dict[str, Any]) -> dict[str, Any]:
    tok = from_description(description)
    return {"type": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}


def _data_info(path: Path, verify: bool) -> dict[str, Any]:
    data = PreparedData.open(path, verify=False if verify else None)  # hashed once, below
    meta = data.meta
    verified = {"verified_shards": data.verify()} if verify else {}
    return {
        **verified,
        "kind": "data",
        "name": str(path),
        "tokenizer": _tokenizer_summary(meta["tokenizer"]),
        "dtype": meta["dtype"],
        "splits": {s: {k: v for k, v in meta["splits"][s].items() if k != "shards"} for s in meta["splits"]},
        "sources": meta["sources"],
        "gptkit_version": meta["gptkit_version"],
    }


def _checkpoint_info(path: Path, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    from gptkit.checkpoint import load_checkpoint

    payload = payload if payload is not None else load_checkpoint(path, map_location="cpu")
    config = validate(RunConfig, payload["config"], f"checkpoint {path}")
    out = {
        "kind": "checkpoint",
        "name": str(path),
        **_model_info(config.model),
        "tokenizer": _tokenizer_summary(payload["tokenizer"]),
        "progress": payload["progress"],
        "gptkit_version": payload["gptkit_version"],
    }
    if config.finetune.base is not None:
        out["finetune"] = _finetune_summary(config)
        adapter = path.parent.parent / "adapter"
        if config.finetune.method == "lora" and adapter.is_dir():
            out["finetune"]["adapter"] = str(adapter)
    return out


def _run_info(path: Path) -> dict[str, Any]:
    """The newest intact checkpoint of the run speaks for it."""
    from gptkit.checkpoint import newest_intact

    ckpt, payload = newest_intact(path)
    return {**_checkpoint_info(ckpt, payload), "kind": "run", "name": str(path), "checkpoint": str(ckpt)}


def _hf_info(path: Path) -> dict[str, Any]:
    from gptkit.interop.hf import load_hf

    _, tokenizer, config = load_hf(path)
    tok = {"type": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}
    return {"kind": "HuggingFace folder", "name": str(path), **_model_info(config.model), "tokenizer": tok}


def _adapter_info(path: Path) -> dict[str, Any]:
    """A LoRA adapter folder (gptkit's or peft's): rank, layers, size, and the run that made it."""
    peft = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    with (path / "adapter_model.safetensors").open("rb") as f:  # the header alone: no torch
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    shapes = [v["shape"] for k, v in header.items() if k != "__metadata__"]
    params = 0
    for shape in shapes:
        n = 1
        for size in shape:
            n *= size
        params += n
    out: dict[str, Any] = {
        "kind": "adapter",
        "name": str(path),
        "adapter": {
            "type": peft.get("peft_type", "LORA"),
            "r": peft.get("r"),
            "alpha": peft.get("lora_alpha"),
            "targets": peft.get("target_modules"),
            "layers": len(shapes) // 2,
            "params": params,
            "base": peft.get("base_model_name_or_path") or None,
        },
    }
    run_config = path.parent / CONFIG_FILE
    if run_config.is_file():
        config = validate(RunConfig, yaml.safe_load(run_config.read_text(encoding="utf-8")), str(run_config))
        out["finetune"] = _finetune_summary(config)
    return out


def _number(value: Any) -> str:
    """A value as people read it: 1,234 for counts, 4 decimals for losses, "none yet" for None."""
    if value is None:
        return "none yet"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    )


def _progress_line(progress: dict[str, Any]) -> str:
    parts = []
    for key, value in progress.items():
        if key == "wall_seconds" and isinstance(value, (int, float)):
            parts.append(f"training time {_duration(value)}")
        else:
            parts.append(f"{key.replace('_', ' ')} {_number(value)}")
    return "progress: " + ", ".join(parts)


def _finetune_line(ft: dict[str, Any]) -> str:
    method = ft["method"]
    if "lora" in ft:
        lora = ft["lora"]
        method += f" (r {lora['r']}, alpha {lora['alpha']:g}, on {', '.join(lora['targets'])})"
    if "prompt_tokens" in ft:
        method += f" ({ft['prompt_tokens']} soft-prompt vectors)"
    line = f"fine-tune: {method} of {ft['base']}"
    if ft.get("base_missing"):
        line += " (the base does not exist yet: train it first; model shape and tokenizer are the base's)"
    if "instructions" in ft:
        line += f"; instructions {ft['instructions']} (template {ft['template']})"
    elif "data" in ft:
        line += f"; data {ft['data']} (continued pre-training)"
    if "adapter" in ft:
        line += f"; adapter {ft['adapter']}"
    return line


def format_info(info: dict[str, Any]) -> str:
    """Human-readable lines for the terminal (`--json` keeps the raw values)."""
    lines = [f"{info['kind']}: {info['name']}"]
    if "adapter" in info:
        a = info["adapter"]
        targets = ", ".join(a["targets"] or [])
        lines.append(
            f"adapter: {a['type']} r {a['r']}, alpha {a['alpha']}, {a['layers']} layers ({targets}), "
            f"{a['params']:,} parameters"
        )
        if a.get("base"):
            lines.append(f"trained on base: {a['base']}")
    if "finetune" in info:
        lines.append(_finetune_line(info["finetune"]))
    if "model" in info:
        m = info["model"]
        lines.append(
            f"architecture: {_family(m)}, {m['n_layer']} layers, {m['n_head']} heads, width {m['n_embd']}, "
            f"context {m['block_size']}, vocab {m['vocab_size']:,} (padded to {m['padded_vocab_size']:,}), "
            f"dropout {m['dropout']}, bias {m['bias']}"
        )
        lines.append(
            f"parameters: {info['params']:,} total, {info['params_without_position']:,} without position "
            f"embeddings ({info['params'] / 1e6:.2f}M)"
        )
    if "tokenizer" in info:
        t = info["tokenizer"]
        extra = f", vocab {t['vocab_size']:,}" if "vocab_size" in t else ""
        lines.append(f"tokenizer: {t['type']}{extra}")
    if "splits" in info:
        for split, s in info["splits"].items():
            lines.append(f"{split}: {s['tokens']:,} tokens, {s['documents']:,} documents")
        lines.append(f"token dtype: {info['dtype']}")
    if "verified_shards" in info:
        n = info["verified_shards"]
        lines.append(
            f"verified: {n} shard(s) match the sha256 in meta.json"
            if n
            else "verified: no shard has a sha256 in meta.json (prepared before gptkit recorded them)"
        )
    if info.get("progress"):
        lines.append(_progress_line(info["progress"]))
    if "checkpoint" in info:
        lines.append(f"checkpoint: {info['checkpoint']}")
    return "\n".join(lines)
