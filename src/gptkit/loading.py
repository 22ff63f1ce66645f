"""The one loader of whatever the user pointed at: a run folder, a checkpoint file or a HuggingFace
GPT-2 folder → model. It builds the model a payload describes, with a fine-tune's modules applied
and LoRA merged, so the checkpoint format itself knows nothing of models or fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptkit.checkpoint import clean_state_dict, is_run, newest_intact
from gptkit.config import RunConfig, validate
from gptkit.errors import GptkitError
from gptkit.finetuning.lora import merge
from gptkit.finetuning.methods import apply_method
from gptkit.interop.hf import load_hf, read_hf_config, read_tokenizer
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer, from_description


def load_model(payload: dict[str, Any]) -> tuple[GPT, Tokenizer, RunConfig]:
    """The model (on CPU, eval mode), tokenizer and config a checkpoint's payload holds."""
    config = validate(RunConfig, payload["config"], "checkpoint config")
    tokenizer = from_description(payload["tokenizer"])
    if config.model.vocab_size != tokenizer.vocab_size:
        raise GptkitError(
            f"checkpoint's model has {config.model.vocab_size} token ids but its tokenizer has "
            f"{tokenizer.vocab_size}; the checkpoint is inconsistent, use another one"
        )
    model = GPT(config.model)
    if config.finetune.base is not None:  # a fine-tune's checkpoint: its modules (LoRA, soft prompt)
        model = apply_method(model, config.finetune, tokenizer)
        model.load_state_dict(clean_state_dict(payload["model"]))
        merge(model)  # LoRA folded into the weights: a plain model, as fast as the base
    else:
        model.load_state_dict(clean_state_dict(payload["model"]))
    return model.eval(), tokenizer, config


def is_hf_folder(path: str | Path) -> bool:
    """A HuggingFace model folder (config.json inside) rather than a gptkit run."""
    return (Path(path) / "config.json").is_file() and not is_run(path)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a run folder, checkpoint file or HF folder, without building its model: what
    `prepare --tokenizer model:PATH` tokenizes with, so the data fits a model trained or imported."""
    if is_hf_folder(path):
        cfg = read_hf_config(Path(path))
        return read_tokenizer(Path(path), int(cfg.get("vocab_size", 0)))
    _, payload = newest_intact(path)
    return from_description(payload["tokenizer"])


def load_any(path: str | Path) -> tuple[GPT, Tokenizer, RunConfig, Path, dict[str, Any]]:
    """(model, tokenizer, run config, source, checkpoint payload) of a run folder (its newest intact
    checkpoint), a checkpoint file, or a HuggingFace GPT-2 folder (payload {}): what every command
    that starts from a trained model accepts."""
    if is_hf_folder(path):
        model, tokenizer, config = load_hf(path)
        return model, tokenizer, config, Path(path), {}
    ckpt, payload = newest_intact(path)
    model, tokenizer, config = load_model(payload)
    return model, tokenizer, config, ckpt, payload
