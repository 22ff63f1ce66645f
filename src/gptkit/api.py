"""The Python API: every CLI command is a thin layer over one of these functions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptkit.generate.textmodel import TextModel
    from gptkit.train.trainer import TrainResult


def prepare(
    sources: list[str] | None = None,
    out: str | Path = "data/default",
    *,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Tokenize text sources into token shards plus meta.json; returns the meta dict.

    `sources` are text files, folders, .jsonl/.parquet files or `hf:NAME` datasets; none means the
    built-in default corpus (Python's documentation). `settings` are `PrepareConfig` fields.
    """
    from gptkit.config import PrepareConfig, validate
    from gptkit.data.prepare import prepare_data

    config = validate(PrepareConfig, settings, "prepare settings")
    return prepare_data(sources or [], Path(out), config, overwrite=overwrite, progress=progress)


def train(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    resume: str | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Pre-train from a YAML config plus dotted overrides; `resume` is "latest", "auto" or a checkpoint;
    `stop_at` checkpoints and returns at that step (the schedule still spans train.max_steps)."""
    from gptkit.config import load_config
    from gptkit.train.launch import train as run_training

    return run_training(load_config(config, overrides), config_path=config, resume=resume, stop_at=stop_at)


def info(target: str) -> dict[str, Any]:
    """Describe a preset, config file, prepared data folder, run folder or checkpoint."""
    from gptkit.describe import describe

    return describe(target)


def load(path: str | Path, *, device: str = "auto", quantize: str | None = None) -> TextModel:
    """A trained model to generate with: `gptkit.load("runs/tiny").generate("Once upon a time")`.

    `path` is a run folder (its newest intact checkpoint) or a checkpoint file. `device` "auto" picks
    cuda, then mps, then cpu. `quantize` "int8" or "int4" makes weight-only quantised linear layers
    (CPU inference: less memory, faster decoding; see README).
    """
    from gptkit.checkpoint import find_checkpoint, load_model
    from gptkit.device import pick_device
    from gptkit.errors import GptkitError
    from gptkit.generate.textmodel import TextModel

    if quantize not in (None, "int8", "int4"):
        raise GptkitError(f"quantize must be int8 or int4, not {quantize!r}")
    target = pick_device(device)
    ckpt, payload = find_checkpoint(path)
    model, tokenizer, _ = load_model(payload)
    model = model.to(target)
    if quantize is not None:
        from gptkit.generate.quantize import quantize as quantize_model

        quantize_model(model, quantize)
    return TextModel(model, tokenizer, source=str(ckpt), chat_template=payload.get("chat_template"))
