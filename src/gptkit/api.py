"""The Python API: every CLI command is a thin layer over one of these functions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.config import EVAL_BATCH_SIZE, EVAL_DATA_DIR, EVAL_MAX_NEW_TOKENS

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from gptkit.config import RunConfig
    from gptkit.generate.textmodel import TextModel
    from gptkit.training.trainer import TrainResult


def prepare(
    sources: list[str | Path] | None = None,
    out: str | Path = "data/default",
    *,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Tokenize text sources into token shards plus meta.json; returns the meta dict.

    `sources` are text files, folders, .jsonl/.parquet files or `hf:NAME` datasets; none means the
    built-in default corpus (Python's documentation). `settings` are `PrepareConfig` fields;
    `tokenizer="model:PATH"` tokenizes with the tokenizer of that run, checkpoint or HF folder.
    """
    from gptkit.config import MODEL_TOKENIZER, PrepareConfig, validate
    from gptkit.data.prepare import prepare_data

    config = validate(PrepareConfig, settings, "prepare settings")
    if isinstance(sources, (str, Path)):  # one source given bare
        sources = [sources]
    specs = [str(s) for s in sources or []]
    tokenizer = None
    if config.tokenizer.startswith(MODEL_TOKENIZER):
        from gptkit.loading import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer[len(MODEL_TOKENIZER) :])
    return prepare_data(specs, Path(out), config, overwrite=overwrite, progress=progress, tokenizer=tokenizer)


def prepare_mixture(
    config: str | Path,
    out: str | Path,
    *,
    tokens: int | None = None,
    overwrite: bool = False,
    overrides: list[str] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Write the streamed mixture of a run config's `data.sources` as one prepared shard set (the
    documents a streamed run with that config and `train.seed` draws); `settings` are `PrepareConfig`
    fields (the tokenizer is the config's `data.tokenizer`)."""
    from gptkit.config import PrepareConfig, load_config, validate
    from gptkit.data.prepare_mixture import prepare_mixture as write_mixture

    run = load_config(config, [*(overrides or []), "data.stream=true"])
    prep = validate(PrepareConfig, {**settings, "tokenizer": run.data.tokenizer}, "prepare settings")
    return write_mixture(run.data, Path(out), prep, run.train.seed, tokens, overwrite)


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

    return _run(load_config(config, overrides), config, resume, stop_at, finetuning=False)


def finetune(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    resume: str | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Fine-tune `finetune.base` as the config says (method, data); the same trainer as `train`."""
    from gptkit.config import load_config

    return _run(load_config(config, overrides), config, resume, stop_at, finetuning=True)


def _run(
    run: RunConfig, config_path: str | Path | None, resume: str | None, stop_at: int | None, finetuning: bool
) -> TrainResult:
    """The one training launch; the command decides the mode, and the parts that sit above training
    (the base model's loader, the task evaluator) are made here and passed down."""
    from gptkit.eval.run import TrainingTasks
    from gptkit.loading import load_any
    from gptkit.training.launch import train as run_training

    tasks = TrainingTasks(run.eval, run.data.path) if run.eval.tasks else None
    return run_training(
        run,
        config_path=config_path,
        resume=resume,
        stop_at=stop_at,
        load_base=load_any if finetuning else None,
        tasks=tasks,
    )


def info(target: str, verify: bool = False) -> dict[str, Any]:
    """Describe a preset, config file, prepared data folder, run folder or checkpoint; `verify`
    checks every shard of prepared data against the sha256 in its meta.json, however large."""
    from gptkit.describe import describe

    return describe(target, verify=verify)


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
    from gptkit.device import pick_device
    from gptkit.generate.inference import check_quantize, prepare
    from gptkit.generate.textmodel import TextModel
    from gptkit.loading import load_any

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


def serve(
    model: str | Path | TextModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    quantize: str | None = None,
    adapters: Sequence[str | Path | tuple[str | Path, float]] = (),
    device: str = "auto",
    max_batch: int = 8,
    max_queue: int = 64,
    cors_origin: str | None = None,
    rag: str | Path | None = None,
    rag_k: int = 3,
) -> None:
    """Serve a model over OpenAI's HTTP API until interrupted: `/v1/completions`,
    `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics` and the chat page at `/`.

    `model` is what `load` takes (loaded with `quantize` and `adapters`) or a loaded model. Up to
    `max_batch` sequences decode together, up to `max_queue` requests wait (then 429). `port` 0
    picks a free port (the address is printed). `api_key`
    (default: the GPTKIT_API_KEY environment variable) is required as `Authorization: Bearer KEY` on
    every route but /health and the page. Needs the `serve` extra (FastAPI, uvicorn, prometheus_client).
    `rag`: an index folder; each chat request's last user message, and each completion prompt, is
    answered from its `rag_k` passages, listed in the response's `sources` field (a request with
    `"rag": false` is answered without them).
    """
    try:
        from gptkit.serve.server import listen, run
    except ImportError as e:
        from gptkit.errors import GptkitError

        raise GptkitError(
            f"serving needs the serve extra ({e.name} is missing): pip install 'gptkit[serve]'"
        ) from None
    from gptkit.generate.textmodel import TextModel

    sock = listen(host, port)  # before loading: a port in use fails at once
    retriever = None
    if rag is not None:
        from gptkit.rag import Retriever

        retriever = Retriever(rag, k=rag_k)
    if not isinstance(model, TextModel):
        model = load(model, device=device, quantize=quantize, adapters=adapters)
    key = api_key if api_key is not None else os.environ.get("GPTKIT_API_KEY") or None
    run(
        model,
        sock,
        api_key=key,
        max_batch=max_batch,
        max_queue=max_queue,
        cors_origin=cors_origin,
        rag=retriever,
    )


def export_model(
    source: str | Path, target: str, out: str | Path, *, type: str = "f16", force: bool = False
) -> list[Path]:
    """Export a run folder, checkpoint or HF folder; returns the files or folder written.

    `target`: `hf` (a folder transformers loads), `onnx` (OUT.onnx and OUT_with_past.onnx),
    `gguf` (llama.cpp's gpt2 layout; `type` f32, f16 or q8_0) or `safetensors` (a weights-only
    gptkit checkpoint). An existing output is replaced only with `force`.
    """
    from gptkit.config import EXPORT_TARGETS
    from gptkit.errors import GptkitError
    from gptkit.loading import load_any

    if target not in EXPORT_TARGETS:
        raise GptkitError(f"export target must be one of {', '.join(EXPORT_TARGETS)}, not {target!r}")
    from gptkit.interop import check_not_input

    check_not_input(out, source)
    model, tokenizer, config, _, payload = load_any(source)
    if target == "hf":
        from gptkit.interop.hf import export_hf

        return [export_hf(model, tokenizer, out, force=force)]
    if target == "onnx":
        from gptkit.interop.onnx import export_onnx

        return list(export_onnx(model, out, force=force))
    if target == "gguf":
        from gptkit.interop.gguf import export_gguf

        name = config.name or Path(source).stem
        return [export_gguf(model, tokenizer, out, type=type, name=name, force=force)]
    from gptkit.interop import save_weights

    if not str(out).endswith(".safetensors"):
        raise GptkitError(f"safetensors output {str(out)!r} should end in .safetensors")
    progress, template = payload.get("progress"), payload.get("chat_template")
    return [
        save_weights(model, tokenizer, config, out, force=force, progress=progress, chat_template=template)
    ]


def import_model(source: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """A HuggingFace GPT-2 or Llama folder, or hub name -> a gptkit checkpoint (`.pt`, or `.safetensors`)."""
    from gptkit.interop.hf import import_hf

    return import_hf(source, out, force=force)


def evaluate(
    path: str | Path,
    tasks: str | list[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    data_dir: str | Path = EVAL_DATA_DIR,
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
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
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
