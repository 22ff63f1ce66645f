"""The Python API: every CLI command is a thin layer over one of these functions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from gptkit.generate.textmodel import TextModel
    from gptkit.training.trainer import TrainResult


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
    from gptkit.training.launch import train as run_training

    return run_training(load_config(config, overrides), config_path=config, resume=resume, stop_at=stop_at)


def finetune(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    resume: str | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Fine-tune `finetune.base` as the config says (method, data); the same trainer as `train`."""
    from gptkit.config import load_config
    from gptkit.errors import GptkitError
    from gptkit.training.launch import train as run_training

    run = load_config(config, overrides)
    if run.finetune.base is None:
        raise GptkitError(
            "finetune.base is not set; name the model to start from: a run folder, checkpoint or "
            "HuggingFace GPT-2 folder (e.g. finetune.base=runs/tiny)"
        )
    return run_training(run, config_path=config, resume=resume, stop_at=stop_at)


def info(target: str) -> dict[str, Any]:
    """Describe a preset, config file, prepared data folder, run folder or checkpoint."""
    from gptkit.describe import describe

    return describe(target)


def load(
    path: str | Path,
    *,
    device: str = "auto",
    quantize: str | None = None,
    adapters: Sequence[str | Path | tuple[str | Path, float]] = (),
) -> TextModel:
    """A trained model to generate with: `gptkit.load("runs/tiny").generate("Once upon a time")`.

    `path` is a run folder (its newest intact checkpoint), a checkpoint file (`.pt` or `.safetensors`)
    or a HuggingFace GPT-2 folder (with config.json, as `gptkit export hf` writes). `device` "auto" picks
    cuda, then mps, then cpu. `adapters`: LoRA adapter folders (gptkit's or peft's), each a path or
    (path, weight), stacked (their weighted changes add up) and folded into the weights. `quantize`
    "int8" or "int4" makes quantised linear layers (CPU inference: less memory, faster decoding;
    see README); without it, an fp32 model on the CPU decodes through gptkit's CPU kernels
    (`gptkit.generate.cpu`).
    """
    from gptkit.checkpoint import load_any
    from gptkit.device import pick_device
    from gptkit.generate.inference import check_quantize, prepare
    from gptkit.generate.textmodel import TextModel

    check_quantize(quantize)
    target = pick_device(device)
    model, tokenizer, _, ckpt, payload = load_any(path)
    if adapters:
        from gptkit.finetuning.lora import load_adapter, merge

        for item in adapters:
            adapter, weight = item if isinstance(item, tuple) else (item, 1.0)
            load_adapter(model, adapter, weight=weight)
        merge(model)  # one plain model again: decoding as fast as the base
    model = prepare(model, target, quantize)  # int8/int4, or fp32 through gptkit's CPU kernels
    return TextModel(model, tokenizer, source=str(ckpt), chat_template=payload.get("chat_template"))


EXPORT_TARGETS = ("hf", "onnx", "gguf", "safetensors")


def export_model(
    source: str | Path, target: str, out: str | Path, *, type: str = "f16", force: bool = False
) -> list[Path]:
    """Export a run folder, checkpoint or HF folder; returns the files or folder written.

    `target`: `hf` (a folder transformers loads), `onnx` (OUT.onnx and OUT_with_past.onnx),
    `gguf` (llama.cpp's gpt2 layout; `type` f32, f16 or q8_0) or `safetensors` (a weights-only
    gptkit checkpoint). An existing output is replaced only with `force`.
    """
    from gptkit.checkpoint import load_any
    from gptkit.errors import GptkitError

    if target not in EXPORT_TARGETS:
        raise GptkitError(f"export target must be one of {', '.join(EXPORT_TARGETS)}, not {target!r}")
    model, tokenizer, config, _, payload = load_any(source)
    if target == "hf":
        from gptkit.export.hf import export_hf

        return [export_hf(model, tokenizer, out, force=force)]
    if target == "onnx":
        from gptkit.export.onnx import export_onnx

        return list(export_onnx(model, out, force=force))
    if target == "gguf":
        from gptkit.export.gguf import export_gguf

        name = config.name or Path(source).stem
        return [export_gguf(model, tokenizer, out, type=type, name=name, force=force)]
    from gptkit.export import save_weights

    if not str(out).endswith(".safetensors"):
        raise GptkitError(f"safetensors output {str(out)!r} should end in .safetensors")
    progress, template = payload.get("progress"), payload.get("chat_template")
    return [
        save_weights(model, tokenizer, config, out, force=force, progress=progress, chat_template=template)
    ]


def import_model(source: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """A HuggingFace GPT-2 folder -> a gptkit checkpoint (`.pt`, or weights-only `.safetensors`)."""
    from gptkit.export.hf import import_hf

    return import_hf(source, out, force=force)


def evaluate(
    path: str | Path,
    tasks: str | list[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | Path = "data/eval",
    files: dict[str, str | Path] | None = None,
    text: str | Path | None = None,
    window: int | None = None,
    stride: int | None = None,
    all_checkpoints: bool = False,
    device: str = "auto",
    quantize: str | None = None,
    tensorboard: bool = False,
    mlflow: bool = False,
    progress: bool = True,
    prompts: str | Path | None = None,
    max_new_tokens: int = 128,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate a checkpoint (or a run's newest, or with `all_checkpoints` every one not yet evaluated)
    on "perplexity", "hellaswag", "lambada", "piqa"; results also go to the run's eval.json.

    Task files are found under `data_dir` or named in `files` ({"piqa": "valid.jsonl"}); perplexity
    reads `text` (a prepared data folder's val shards or a text file; None: the model's training data)
    in windows of `window` tokens (default: the context) starting `stride` apart (default: window).
    `prompts`: a file of test questions, one a line, that each checkpoint also answers (greedily, at
    most `max_new_tokens` tokens, with its chat template), kept in eval.json and the run's eval.md.
    `tasks` None: perplexity, or no task when `prompts` is given.
    Returns, per checkpoint evaluated: {"checkpoint", "step", "results": {task: metrics},
    "answers": [{"question", "answer"}] or None}.
    """
    from gptkit.eval.run import EvalSettings, evaluate_checkpoints

    if tasks is None:
        tasks = [] if prompts is not None else ["perplexity"]
    settings = EvalSettings(
        tasks=tasks if isinstance(tasks, list) else tasks.split(","),
        limit=limit,
        batch_size=batch_size,
        data_dir=data_dir,
        files=dict(files or {}),
        text=text,
        window=window,
        stride=stride,
        progress=progress,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
    )
    return evaluate_checkpoints(
        path,
        settings,
        all_checkpoints=all_checkpoints,
        device=device,
        quantize=quantize,
        tensorboard=tensorboard,
        mlflow=mlflow,
        on_result=on_result,
    )
