"""`gptkit finetune`: a base model, its tokenizer, a method and data, handed to the one trainer.

The base is a run folder, a checkpoint or a HuggingFace GPT-2 folder; the model's shape and the
tokenizer are always the base's. The method decides what trains (`gptkit.finetuning.methods`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptkit.checkpoint import load_any
from gptkit.config import FinetuneConfig, RunConfig
from gptkit.console import notice
from gptkit.data.shards import PreparedData
from gptkit.errors import GptkitError
from gptkit.finetuning import lora
from gptkit.finetuning.instructions import InstructionBatches, load_instructions, val_batches
from gptkit.finetuning.methods import apply_method
from gptkit.training import distributed
from gptkit.training.launch import Parts, resolve_batch, shard_sources
from gptkit.training.trainer import Trainer, seed_everything


def finetune_parts(
    config: RunConfig, procs: distributed.Processes, path: Path | None, payload: dict[str, Any] | None
) -> Parts:
    fc = config.finetune
    assert fc.base is not None
    model, tokenizer, base_config, base_path, _ = load_any(fc.base)
    notice(f"fine-tuning {base_path} ({fc.method}); the model's shape and tokenizer are the base's")
    if payload is not None and payload["tokenizer"] != tokenizer.describe():
        raise GptkitError(
            f"checkpoint {path} was fine-tuned from a base with another tokenizer than {fc.base}"
        )
    if payload is not None and payload.get("state"):
        check_same_method(fc, payload["config"].get("finetune") or {}, path)
    shape = base_config.model.model_copy(update={"dropout": config.model.dropout})
    config = config.model_copy(update={"model": shape})
    seed_everything(config.train.seed)
    model = apply_method(model, fc, tokenizer)
    config = resolve_batch(config, model.num_params(), procs)
    micro = int(config.train.micro_batch_size)
    room = model.tokens_that_fit()  # prompt tuning's vectors take part of the context
    if fc.method == "prompt" and config.data.packing and config.data.instructions is not None:
        notice("prompt tuning pads examples (data.packing=false): each example gets its own soft prompt")
        config = config.model_copy(update={"data": config.data.model_copy(update={"packing": False})})
    template = None
    if config.data.instructions is not None:
        train, held_out, chat_template = load_instructions(config, tokenizer, room)
        source: Any = InstructionBatches(
            train, micro, room, config.data.packing, config.data.seed, procs.rank, procs.world_size
        )
        val = val_batches(held_out, micro, room, config.data.packing, config.eval.batches)
        template = chat_template.to_dict()
    else:  # continued pre-training on prepared shards
        data = PreparedData.open(config.data.path)
        data.check_tokenizer(tokenizer.fingerprint(), f"base model {base_path}")
        source, val = shard_sources(config, data, procs, window=room)
    notice(f"{model.num_params(trainable=True):,} trainable parameters of {model.num_params():,}")
    finish = _save_adapter(fc, base_path) if fc.method == "lora" else None
    return Parts(config, model, tokenizer, source, val, chat_template=template, finish=finish)


def check_same_method(fc: FinetuneConfig, saved: dict[str, Any], path: Path | None) -> None:
    """What shapes the trained parameters and the optimiser's groups must match the checkpoint's:
    compared here, before any state dict is loaded, so a change is named rather than a mismatch."""
    now = fc.model_dump(mode="json")
    keys = ["method"]
    if now["method"] == "lora" and saved.get("method") == "lora":
        keys += [f"lora.{k}" for k in ("r", "alpha", "targets", "train_biases", "train_layernorms")]
    if now["method"] == "prompt" and saved.get("method") == "prompt":
        keys.append("prompt_tokens")

    def get(tree: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            tree = tree.get(part, {}) if isinstance(tree, dict) else {}
        return tree

    diffs = [f"finetune.{k} {get(saved, k)} -> {get(now, k)}" for k in keys if get(saved, k) != get(now, k)]
    if diffs:
        raise GptkitError(
            f"the config's fine-tuning differs from checkpoint {path} ({', '.join(diffs)}); resume with "
            "the checkpoint's settings, or fine-tune under a new run name (name=...)"
        )


def _save_adapter(fc: FinetuneConfig, base_path: Path) -> Any:
    def finish(trainer: Trainer) -> None:
        out = lora.save_adapter(
            trainer.model, trainer.run_dir / lora.ADAPTER_DIR, fc.lora, base=str(base_path)
        )
        notice(f"LoRA adapter: {out} (peft layout; gptkit.finetuning.lora.load_adapter or peft load it)")

    return finish
