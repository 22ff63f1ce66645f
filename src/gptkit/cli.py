"""`gptkit <command>`: argument parsing only; every command calls the Python API.

Each command is a pair of functions, `add_<command>` (its arguments) and `run_<command>` (the
call into gptkit.api), registered in COMMANDS; a new command adds one pair.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from gptkit.config import (
    EVAL_BATCH_SIZE,
    EVAL_DATA_DIR,
    EVAL_MAX_NEW_TOKENS,
    EXPORT_TARGETS,
    QUANTIZE_MODES,
    PrepareConfig,
)
from gptkit.errors import GptkitError, describe_os_error


class Formatter(argparse.HelpFormatter):
    """Shows every option's default, including options given no help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        shown = action.default not in (None, argparse.SUPPRESS) and not action.required
        if shown and "%(default)" not in help_text and action.option_strings:
            help_text += " (default: %(default)s)"
        return help_text.strip()


def _default(field: str) -> Any:
    return PrepareConfig.model_fields[field].default


def add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="text files, folders, .jsonl/.parquet files or hf:NAME[:CONFIG][@SPLIT]; "
        "none: Python's documentation (built in)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and meta.json")
    p.add_argument(
        "--tokenizer",
        default=_default("tokenizer"),
        metavar="gpt2|char|bpe|model:PATH",
        help="tokenizer to use; model:PATH: the one a run, checkpoint or HF folder carries (to fine-tune it)",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="bpe vocabulary size (default: 8192)")
    p.add_argument("--text-field", default=_default("text_field"), help="text field of .jsonl/.parquet rows")
    p.add_argument(
        "--val-fraction", type=float, default=_default("val_fraction"), help="share of documents in val"
    )
    p.add_argument("--seed", type=int, default=_default("seed"), help="seed of the train/val split")
    p.add_argument("--workers", type=int, default=_default("workers"), help="tokenizer processes")
    p.add_argument("--shard-tokens", type=int, default=_default("shard_tokens"), help="tokens per shard")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad documents instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace existing prepared data in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--mix",
        metavar="CONFIG",
        help="write the streamed mixture of CONFIG's data.sources (weights, tokenizer, train.seed) "
        "instead of SOURCEs (default: none)",
    )
    p.add_argument(
        "--tokens", type=int, metavar="N", help="--mix: stop after about N tokens (default: its end)"
    )


def run_prepare(args: argparse.Namespace) -> int:
    from gptkit.api import prepare

    settings = dict(
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        skip_bad=args.skip_bad,
    )
    if args.vocab_size is not None:
        settings["vocab_size"] = args.vocab_size
    if args.mix is not None:
        from gptkit.api import prepare_mixture

        if args.sources:
            raise GptkitError("--mix takes the sources from the config's data.sources; give no SOURCE")
        del settings["tokenizer"], settings["text_field"]
        prepare_mixture(args.mix, args.out, tokens=args.tokens, overwrite=args.overwrite, **settings)
        return 0
    prepare(args.sources, args.out, overwrite=args.overwrite, progress=not args.no_progress, **settings)
    return 0


def add_train(p: argparse.ArgumentParser, example: str = "configs/tiny.yaml") -> None:
    p.add_argument("config", metavar="CONFIG", help=f"YAML config, e.g. {example}")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.lr=3e-4; before or after the options",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="latest|auto|PATH",
        help="continue the run from its newest intact checkpoint, or from a checkpoint file; auto: latest "
        "if the run has checkpoints, else start (for requeued jobs) (default: start)",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and exit at this step; the schedule still spans train.max_steps (default: the end)",
    )
    p.add_argument(
        "--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the config's train.device)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def train_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides, with --device as train.device; --no-progress reaches the run log (and every
    torchrun process) through the environment it already reads."""
    if args.no_progress:
        from gptkit.training.runlog import NO_PROGRESS_ENV

        os.environ[NO_PROGRESS_ENV] = "1"
    return [*args.overrides, *([f"train.device={args.device}"] if args.device else [])]


def run_train(args: argparse.Namespace) -> int:
    from gptkit.api import train

    result = train(args.config, train_overrides(args), resume=args.resume, stop_at=args.stop_at)
    if not result.main:  # under torchrun, rank 0 prints for all
        return 0
    for prompt, text in result.samples.items():
        print(f"--- sample at step {result.step} ---\n{prompt}{text}\n")
    best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    print(f"run folder: {result.run_dir} (step {result.step}, {result.tokens:,} tokens{best})")
    return 0


def add_finetune(p: argparse.ArgumentParser) -> None:
    add_train(p, example="configs/sft.yaml")
    p.description = (
        "fine-tune a base model (finetune.base: a run, checkpoint or HuggingFace GPT-2 folder): full, "
        "lora or prompt tuning (finetune.method), on instruction data (data.instructions) or shards"
    )


def run_finetune(args: argparse.Namespace) -> int:
    from gptkit.api import finetune

    result = finetune(args.config, train_overrides(args), resume=args.resume, stop_at=args.stop_at)
    if not result.main:
        return 0
    best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    print(f"run folder: {result.run_dir} (step {result.step}, {result.tokens:,} tokens{best})")
    return 0


def add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        metavar="PRESET|RUN|CHECKPOINT",
        help="a preset name, run folder, checkpoint, LoRA adapter folder, HuggingFace GPT-2 folder, prepared "
        "data folder or config file (a fine-tune's: its base model)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--verify", action="store_true", help="prepared data: check every shard against its sha256"
    )


def run_info(args: argparse.Namespace) -> int:
    from gptkit.api import info
    from gptkit.describe import format_info

    result = info(args.target, verify=args.verify)
    print(json.dumps(result, indent=1) if args.json else format_info(result))
    return 0


def _setting(field: str) -> Any:
    from gptkit.generate.settings import SampleSettings

    return SampleSettings.model_fields[field].default


def add_model_source(p: argparse.ArgumentParser) -> None:
    """The arguments every command that loads a trained model shares."""
    p.add_argument(
        "model",
        metavar="RUN_OR_CKPT",
        help="a run folder (its newest checkpoint), a checkpoint (.pt or .safetensors) or a HuggingFace "
        "GPT-2 folder",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default=None,
        help="weight-only quantised layers (default: none, full precision)",
    )


def add_sampling(p: argparse.ArgumentParser) -> None:
    """Sampling settings (gptkit.generate.SampleSettings); defaults come from there."""
    p.add_argument("--max-new-tokens", type=int, default=_setting("max_new_tokens"), help="tokens per sample")
    p.add_argument("--temperature", type=float, default=_setting("temperature"), help="0: greedy")
    p.add_argument(
        "--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)"
    )
    p.add_argument("--top-p", type=float, default=_setting("top_p"), help="nucleus sampling mass")
    p.add_argument(
        "--repetition-penalty", type=float, default=_setting("repetition_penalty"), help="> 1 avoids repeats"
    )
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop string, repeatable (default: none)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="the same seed gives the same text (default: random)"
    )


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def add_adapters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="DIR[=WEIGHT]",
        help="a LoRA adapter folder to apply with a weight (1 if not given), repeatable: the changes add up "
        "(default: none)",
    )


def adapter_list(args: argparse.Namespace) -> list[tuple[str, float]]:
    """--adapter DIR[=WEIGHT] values as (folder, weight)."""
    out = []
    for item in args.adapter or []:
        folder, sep, weight = item.rpartition("=")
        if not sep:
            out.append((item, 1.0))
            continue
        try:
            out.append((folder, float(weight)))
        except ValueError:
            raise GptkitError(f"--adapter takes DIR or DIR=WEIGHT with a number, not {item!r}") from None
    return out


def add_sample(p: argparse.ArgumentParser) -> None:
    add_model_source(p)
    add_adapters(p)
    p.add_argument(
        "--prompt", action="append", default=None, metavar="TEXT", help="a prompt, repeatable (default: none)"
    )
    p.add_argument(
        "--prompt-file",
        default=None,
        metavar="FILE",
        help="one prompt per line; - reads standard input (default: none)",
    )
    p.add_argument("--num-samples", type=int, default=_setting("num_samples"), help="samples per prompt")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    add_rag_option(p)
    add_sampling(p)


def add_rag_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rag",
        default=None,
        metavar="INDEX",
        help="answer from the passages of this index (gptkit rag index), sources listed after the answer "
        "(default: none)",
    )
    p.add_argument("--rag-k", type=int, default=3, metavar="K", help="passages retrieved for each prompt")


def open_retriever(index: str, k: int) -> Any:
    from gptkit.rag import Retriever

    return Retriever(index, k=k)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then --prompt-file lines; with neither, standard input (if not a terminal)."""
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            try:
                with open(args.prompt_file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                raise GptkitError(f"prompt file {args.prompt_file!r} not found") from None
            except UnicodeDecodeError:
                raise GptkitError(f"prompt file {args.prompt_file!r} is not UTF-8 text") from None
        prompts += [line for line in lines if line.strip()]
        if not prompts:
            raise GptkitError(f"prompt file {args.prompt_file!r} holds no prompt (one prompt per line)")
    elif not prompts and not sys.stdin.isatty():
        prompts = [sys.stdin.read()]
    if not prompts:
        raise GptkitError("no prompt; give --prompt TEXT, --prompt-file FILE, or text on standard input")
    return prompts


def run_sample(args: argparse.Namespace) -> int:
    from gptkit.api import load

    prompts = read_prompts(args)
    model = load(args.model, device=args.device, quantize=args.quantize, adapters=adapter_list(args))
    settings = sampling_settings(args)
    settings["num_samples"] = args.num_samples
    model.settings = model.settings.of(**settings)  # validated before any work starts
    retriever = open_retriever(args.rag, args.rag_k) if args.rag else None
    composed = (
        [retriever.augment(p, model, model.settings.max_new_tokens) for p in prompts] if retriever else None
    )
    inputs = [text for text, _ in composed] if composed else prompts
    n = len(prompts) * args.num_samples
    texts = [] if args.stream else model.generate(inputs, num_samples=args.num_samples)
    for i in range(n):
        prompt = inputs[i // args.num_samples]
        if n > 1:
            print(f"--- sample {i + 1} of {n} ---", flush=True)
        print(prompt, end="", flush=True)
        if args.stream:
            seed = None if args.seed is None else args.seed + i
            for piece in model.stream(prompt, seed=seed):
                print(piece, end="", flush=True)
        else:
            print(texts[i], end="")
        print(flush=True)
        if composed:
            print_sources(composed[i // args.num_samples][1])
    return 0


def print_sources(sources: list[Any]) -> None:
    from gptkit.rag.compose import format_sources

    print(format_sources(sources), flush=True)


def add_chat(p: argparse.ArgumentParser) -> None:
    add_model_source(p)
    add_adapters(p)
    p.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="system prompt; \"\" for none (default: the template's, e.g. alpaca's preamble)",
    )
    p.add_argument(
        "--template",
        choices=["auto", "alpaca", "chat", "plain"],
        default="auto",
        help="chat template; auto: the checkpoint's, or plain completion for a base model",
    )
    add_rag_option(p)
    add_sampling(p)


def run_chat(args: argparse.Namespace) -> int:
    from gptkit.api import load
    from gptkit.generate.chat import Chat, input_lines
    from gptkit.generate.chat import run_chat as chat_loop
    from gptkit.generate.settings import SampleSettings
    from gptkit.templates import ChatTemplate

    settings = SampleSettings.of(**sampling_settings(args))  # validated before any work starts
    template = None if args.template == "auto" else ChatTemplate.named(args.template)
    model = load(args.model, device=args.device, quantize=args.quantize, adapters=adapter_list(args))
    retriever = open_retriever(args.rag, args.rag_k) if args.rag else None
    chat = Chat(model, template=template, system=args.system, settings=settings, rag=retriever)
    return chat_loop(chat, input_lines(sys.stdin.isatty()), sys.stdout, sys.stderr)


def add_serve(p: argparse.ArgumentParser) -> None:
    add_model_source(p)
    add_adapters(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 opens it to the network")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health and the page "
        "(default: GPTKIT_API_KEY if set, else none)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="sequences that decode together")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    p.add_argument(
        "--cors-origin", default=None, metavar="ORIGIN", help="allow browsers on ORIGIN (default: no CORS)"
    )
    add_rag_option(p)


def run_serve(args: argparse.Namespace) -> int:
    from gptkit.api import serve

    if args.max_batch < 1 or args.max_queue < 1:
        raise GptkitError("--max-batch and --max-queue must be at least 1")
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        quantize=args.quantize,
        adapters=adapter_list(args),
        device=args.device,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        cors_origin=args.cors_origin,
        rag=args.rag,
        rag_k=args.rag_k,
    )
    return 0


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        choices=EXPORT_TARGETS,
        help="hf: a folder transformers loads; onnx: OUT.onnx and OUT_with_past.onnx (KV cache); "
        "gguf: llama.cpp's gpt2 layout; safetensors: a weights-only gptkit checkpoint",
    )
    p.add_argument(
        "model",
        metavar="RUN_OR_CKPT",
        help="a run folder (its newest checkpoint), a checkpoint or a HF folder",
    )
    p.add_argument("out", metavar="OUT", help="output folder (hf) or file")
    p.add_argument(
        "--type",
        choices=["f32", "f16", "q8_0"],
        default=None,
        help="gguf only: how weights are stored (default: f16)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run_export(args: argparse.Namespace) -> int:
    from gptkit.api import export_model

    if args.target != "gguf" and args.type is not None:
        raise GptkitError(f"--type applies to gguf exports only, not to {args.target}")
    kind = args.type or "f16"
    for path in export_model(args.model, args.target, args.out, type=kind, force=args.force):
        print(path)
    return 0


def add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("source_format", choices=["hf"], metavar="hf", help="the format to import: hf")
    p.add_argument(
        "source",
        metavar="DIR|NAME",
        help="a HuggingFace GPT-2 or Llama folder (config.json and weights), or a hub name such as "
        "owner/model (downloaded, or read from the local cache offline)",
    )
    p.add_argument("out", metavar="OUT", help="the gptkit checkpoint to write (.pt, or .safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run_import(args: argparse.Namespace) -> int:
    from gptkit.api import import_model

    print(import_model(args.source, args.out, force=args.force))
    return 0


def add_eval(p: argparse.ArgumentParser) -> None:
    add_model_source(p)
    p.add_argument(
        "--tasks",
        default=None,
        metavar="LIST",
        help="comma-separated: perplexity, hellaswag, lambada, piqa (default: perplexity, or none with "
        "--prompts)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="examples per task, perplexity windows (default: all)"
    )
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help="sequences per forward pass")
    p.add_argument("--data-dir", default=EVAL_DATA_DIR, metavar="DIR", help="folder of the task files")
    p.add_argument(
        "--file",
        action="append",
        default=None,
        metavar="TASK=PATH",
        help="a task's file, repeatable, e.g. piqa=valid.jsonl (default: looked up in --data-dir)",
    )
    p.add_argument(
        "--text",
        default=None,
        metavar="PATH",
        help="perplexity data: a prepared data folder (its val shards) or a text file "
        "(default: the data the model was trained on)",
    )
    p.add_argument(
        "--window", type=int, default=None, help="perplexity window in tokens (default: the context)"
    )
    p.add_argument("--stride", type=int, default=None, help="tokens between windows (default: the window)")
    p.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="every checkpoint of the run not evaluated yet, and a plot",
    )
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="test questions, one a line: each checkpoint's greedy answers (with its chat template) go "
        "to RUN/eval.md and, with --mlflow, to MLflow as text (default: none)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS, help="the longest answer to --prompts"
    )
    p.add_argument("--tensorboard", action="store_true", help="also log to the run's TensorBoard folder")
    p.add_argument("--mlflow", action="store_true", help="also log to the run's MLflow run")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_eval(args: argparse.Namespace) -> int:
    from gptkit.api import evaluate
    from gptkit.eval.run import format_table

    files: dict[str, str] = {}
    for item in args.file or []:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise GptkitError(f"--file takes TASK=PATH, e.g. piqa=valid.jsonl, not {item!r}")
        files[task.strip().lower()] = path

    def show(checkpoint: str, result: dict[str, Any]) -> None:
        if not args.json:
            if result["results"]:
                print(format_table(result["step"], checkpoint, result["results"]) + "\n", flush=True)
            for qa in result["answers"] or []:
                print(f"{checkpoint}: {qa['question']}\n{qa['answer']}\n", flush=True)

    results = evaluate(
        args.model,
        args.tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        files=files,
        text=args.text,
        window=args.window,
        stride=args.stride,
        all_checkpoints=args.all_checkpoints,
        device=args.device,
        quantize=args.quantize,
        tensorboard=args.tensorboard,
        mlflow=args.mlflow,
        progress=not args.no_progress,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        on_result=show,
    )
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


def add_rag(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="rag_command", metavar="ACTION", required=True)
    index = sub.add_parser("index", help="index documents for retrieval", formatter_class=Formatter)
    index.add_argument(
        "docs",
        nargs="+",
        metavar="DOCS",
        help="text/markdown files, folders, .jsonl/.parquet files, SQuAD .json files",
    )
    index.add_argument("--out", required=True, metavar="INDEX", help="the index folder (made or updated)")
    index.add_argument(
        "--embedder", default="minilm", help="minilm, or model:RUN_OR_CKPT (mean-pooled states)"
    )
    index.add_argument(
        "--store", choices=["faiss", "faiss-hnsw", "qdrant"], default="faiss", help="vector store"
    )
    index.add_argument(
        "--chunk-tokens", type=int, default=None, help="tokens per chunk (default: what the embedder reads)"
    )
    index.add_argument("--overlap", type=int, default=32, help="tokens shared by consecutive chunks")
    index.add_argument(
        "--windows", type=int, default=2, help="sentences per extra vector of a chunk; 0: one vector a chunk"
    )
    index.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet rows")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.set_defaults(run=run_rag_index)

    query = sub.add_parser(
        "query", help="the passages of an index nearest a question", formatter_class=Formatter
    )
    query.add_argument("index", metavar="INDEX")
    query.add_argument("question", metavar="QUESTION")
    query.add_argument("-k", type=int, default=5, help="passages to return")
    query.add_argument(
        "--embedder",
        default=None,
        help="embedder to query through (default: the one the index was built with)",
    )
    query.add_argument("--json", action="store_true", help="print one JSON object")
    query.set_defaults(run=run_rag_query)

    ev = sub.add_parser(
        "eval", help="recall@k and MRR on questions with known gold paragraphs", formatter_class=Formatter
    )
    ev.add_argument("index", metavar="INDEX")
    ev.add_argument("--qa", required=True, metavar="FILE", help="SQuAD JSON questions")
    ev.add_argument("-k", default="1,5,10", metavar="LIST", help="comma-separated k values")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(run=run_rag_eval)

    ask = sub.add_parser(
        "ask", help="answer a question from an index, with sources", formatter_class=Formatter
    )
    add_model_source(ask)
    ask.add_argument("index", metavar="INDEX")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument("-k", type=int, default=3, help="passages put into the prompt")
    add_sampling(ask)
    ask.set_defaults(run=run_rag_ask)


def run_rag_index(args: argparse.Namespace) -> int:
    from gptkit.rag import index

    report = index(
        args.docs,
        args.out,
        embedder=args.embedder,
        store=args.store,
        chunk_tokens=args.chunk_tokens,
        overlap=args.overlap,
        windows=args.windows,
        text_field=args.text_field,
        progress=not args.no_progress,
    )
    for line in report.skipped:
        print(f"gptkit: skipped {line}", file=sys.stderr)
    print(
        f"{report.index}: {report.chunks} chunks of {report.sources} sources; {report.embedded} embedded "
        f"({report.chunks_per_second:.1f} chunks/s), {report.reused} reused, {report.removed} removed, "
        f"{len(report.skipped)} skipped"
    )
    return 0


def run_rag_query(args: argparse.Namespace) -> int:
    from gptkit.rag import Retriever
    from gptkit.rag.retriever import check_k

    check_k(args.k)
    with Retriever(args.index, embedder=args.embedder) as retriever:
        hits = retriever.search(args.question, args.k)
    if args.json:
        print(json.dumps({"question": args.question, "hits": [h.record() for h in hits]}, ensure_ascii=False))
        return 0
    for n, h in enumerate(hits, start=1):
        print(f"[{n}] {h.score:.4f} {h.doc} characters {h.start}-{h.end}\n{h.text}\n")
    return 0


def run_rag_eval(args: argparse.Namespace) -> int:
    from gptkit.rag import Retriever
    from gptkit.rag.evaluate import evaluate, squad_questions

    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
    except ValueError:
        raise GptkitError(f"-k takes comma-separated numbers, e.g. 1,5,10, not {args.k!r}") from None
    if not ks:
        raise GptkitError("-k names no k; e.g. -k 1,5,10")
    questions = squad_questions(args.qa)
    with Retriever(args.index) as retriever:
        result = evaluate(retriever, questions, ks)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>10}  {value:.4f}" if isinstance(value, float) else f"{key:>10}  {value}")
    return 0


def run_rag_ask(args: argparse.Namespace) -> int:
    from gptkit.api import load

    model = load(args.model, device=args.device, quantize=args.quantize)
    model.settings = model.settings.of(**sampling_settings(args))
    with open_retriever(args.index, args.k) as retriever:
        answer = model.generate(args.question, rag=retriever)
    print(str(answer).strip(), flush=True)
    print_sources(answer.sources)
    return 0


COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int] | None]
] = {
    "prepare": ("tokenize text into token shards for training", add_prepare, run_prepare),
    "train": ("pre-train a model on prepared data", add_train, run_train),
    "finetune": ("fine-tune a trained model: full, LoRA or prompt tuning", add_finetune, run_finetune),
    "info": ("describe a preset, run, checkpoint, prepared data or config", add_info, run_info),
    "sample": ("generate text from a trained model", add_sample, run_sample),
    "chat": ("talk to an instruction-tuned model in the terminal", add_chat, run_chat),
    "serve": ("serve a model over OpenAI's HTTP API, with a chat page", add_serve, run_serve),
    "export": ("export a model to HuggingFace, ONNX, GGUF or safetensors", add_export, run_export),
    "import": ("import a HuggingFace GPT-2 or Llama model as a gptkit checkpoint", add_import, run_import),
    "eval": ("perplexity and zero-shot benchmarks (hellaswag, lambada, piqa)", add_eval, run_eval),
    "rag": ("retrieval: index documents, query and evaluate an index, answer with sources", add_rag, None),
}


def build_parser() -> argparse.ArgumentParser:
    from gptkit.version import __version__

    parser = argparse.ArgumentParser(
        prog="gptkit",
        description="Train GPT-2-style language models from scratch and put them to use.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"gptkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter)
        add(p)
        if run is not None:  # a command with actions (rag) sets each action's own
            p.set_defaults(run=run)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and KEY=VALUE overrides mix in any order (`train CONFIG --resume X name=q2`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # argparse's own message and exit code for what is really unknown
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.run(args)
    except GptkitError as e:
        print(f"gptkit: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output left (`| head`): not an error of ours
        # Python's advice: point stdout at /dev/null, so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE
    except OSError as e:  # a system error no command words itself: still one line, no traceback
        print(f"gptkit: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
