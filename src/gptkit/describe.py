"""`gptkit info`: what a preset, config file, prepared data, run or checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptkit.checkpoint import is_run, load_checkpoint, newest_intact
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
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.tokenizer import from_description


def describe(target: str, verify: bool = False) -> dict[str, Any]:
    path = Path(target)
    if target in MODEL_PRESETS and not path.exists():
        config = ModelConfig(preset=target, vocab_size=GPT2_VOCAB_SIZE)
        return {"kind": "preset", "name": target, **_model_info(config), "tokenizer": {"type": "gpt2"}}
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _config_info(path)
    if path.is_file():
        return _checkpoint_info(path)
    if path.is_dir() and (path / "meta.json").is_file():
        return _data_info(path, verify)
    if path.is_dir() and is_run(path):
        return _run_info(path)
    if path.exists():
        raise GptkitError(f"{target!r} is neither a run, a checkpoint, prepared data nor a config file")
    presets = ", ".join(MODEL_PRESETS)
    hint = did_you_mean(target, MODEL_PRESETS)
    raise GptkitError(
        f"{target!r} not found{hint}; pass a preset ({presets}), a run, a checkpoint or a config"
    )


def _model_info(config: ModelConfig) -> dict[str, Any]:
    with torch.device("meta"):  # shapes only: no memory, no time, even for gpt2-xl
        model = GPT(config)
    return {
        "model": config.model_dump(mode="json") | {"padded_vocab_size": config.padded_vocab_size},
        "params": model.num_params(),
        "params_without_position": model.num_params(include_position=False),
    }


def _config_info(path: Path) -> dict[str, Any]:
    config = load_config(path)
    model = config.model
    tokenizer: dict[str, Any] = {"type": "gpt2"}
    if model.vocab_size is None:
        try:
            data = PreparedData.open(config.data.path)
            model = model.model_copy(update={"vocab_size": data.vocab_size})
            tokenizer = _tokenizer_summary(data.meta["tokenizer"])
        except GptkitError:
            model = model.model_copy(update={"vocab_size": GPT2_VOCAB_SIZE})
    return {"kind": "config", "name": str(path), **_model_info(model), "tokenizer": tokenizer}


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
    payload = payload if payload is not None else load_checkpoint(path, map_location="cpu")
    config = validate(RunConfig, payload["config"], f"checkpoint {path}")
    return {
        "kind": "checkpoint",
        "name": str(path),
        **_model_info(config.model),
        "tokenizer": _tokenizer_summary(payload["tokenizer"]),
        "progress": payload["progress"],
        "gptkit_version": payload["gptkit_version"],
    }


def _run_info(path: Path) -> dict[str, Any]:
    """The newest intact checkpoint of the run speaks for it."""
    ckpt, payload = newest_intact(path)
    return {**_checkpoint_info(ckpt, payload), "kind": "run", "name": str(path), "checkpoint": str(ckpt)}


def format_info(info: dict[str, Any]) -> str:
    """Human-readable lines for the terminal."""
    lines = [f"{info['kind']}: {info['name']}"]
    if "model" in info:
        m = info["model"]
        lines.append(
            f"architecture: GPT-2, {m['n_layer']} layers, {m['n_head']} heads, width {m['n_embd']}, "
            f"context {m['block_size']}, vocab {m['vocab_size']} (padded to {m['padded_vocab_size']}), "
            f"dropout {m['dropout']}, bias {m['bias']}"
        )
        lines.append(
            f"parameters: {info['params']:,} total, {info['params_without_position']:,} without position "
            f"embeddings ({info['params'] / 1e6:.1f}M)"
        )
    if "tokenizer" in info:
        t = info["tokenizer"]
        extra = f", vocab {t['vocab_size']}" if "vocab_size" in t else ""
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
        lines.append(
            "progress: "
            + ", ".join(
                f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in info["progress"].items()
            )
        )
    if "checkpoint" in info:
        lines.append(f"checkpoint: {info['checkpoint']}")
    return "\n".join(lines)
