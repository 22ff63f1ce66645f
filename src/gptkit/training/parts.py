"""What a Trainer is built from: pre-training's parts or fine-tuning's, chosen by the command.

`gptkit train` makes `pretraining_parts` (a fresh model on prepared shards); `gptkit finetune` makes
`finetune_parts` from a base model that its caller loaded (the loader of "run | checkpoint | HF
folder" sits above training, so it is passed in). Both resolve the runtime and the micro-batch
before any work, and every check that can fail runs here, before the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from gptkit.config import FinetuneConfig, RunConfig, validate
from gptkit.console import notice
from gptkit.data.batch import Batch
from gptkit.data.batches import ShardBatches, TokenSource, fixed_batches
from gptkit.data.mixing import StreamBatches
from gptkit.data.shards import PreparedData
from gptkit.data.stream_val import stream_val_batches
from gptkit.data.streams import StreamTokenizer, stream_tokenizer
from gptkit.errors import GptkitError
from gptkit.finetuning import lora
from gptkit.finetuning.instructions import InstructionBatches, load_instructions, val_batches
from gptkit.finetuning.methods import apply_method
from gptkit.fused_loss import next_token_loss
from gptkit.model import GPT
from gptkit.runtime import Processes, Runtime, resolve_runtime
from gptkit.tokenizer import Tokenizer, from_description
from gptkit.training.budget import available_memory, memory_estimate
from gptkit.training.trainer import Trainer, accumulation_steps, seed_everything

# What a checkpoint's weights and numbers depend on: a resume that changes one of them is refused.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "pad_vocab_multiple")
SWITCH_KEYS = (
    "norm", "norm_eps", "mlp", "hidden", "position", "rope_theta", "rope_scaling", "rope_factor",
    "kv_heads", "tie_embeddings",
)  # fmt: skip

# (base) -> (model, tokenizer, base config, base path, payload): `gptkit.checkpoint.load_any`'s shape
BaseLoader = Callable[[str], tuple[GPT, Tokenizer, RunConfig, Path, dict[str, Any]]]


class TaskEvaluator(Protocol):
    """Zero-shot tasks run at each evaluation (made by the caller from `gptkit.eval`)."""

    def check(self) -> None:
        """Read what the tasks need now, so that a missing file fails before step 1."""

    def metrics(
        self, model: torch.nn.Module, tokenizer: Tokenizer, block_size: int, device: torch.device
    ) -> dict[str, float]:
        """The tasks' metrics for the model, flat (`hellaswag/acc`: 0.3)."""
        ...


@dataclass
class Parts:
    """What a Trainer is built from; pre-training and fine-tuning each make a set."""

    config: RunConfig  # resolved: vocabulary, micro-batch
    model: GPT
    tokenizer: Tokenizer
    source: TokenSource
    val: list[Batch] | None
    runtime: Runtime
    command: str = "train"  # the CLI command that continues this run
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # saved in every checkpoint
    finish: Callable[[Trainer], None] | None = None  # after the last step, on rank 0 (e.g. save an adapter)
    tasks: TaskEvaluator | None = None


def check_same_shape(config: RunConfig, payload: dict[str, Any], path: Path) -> None:
    saved = validate(RunConfig, payload["config"], f"checkpoint {path}").model
    diffs = [
        f"{k} {getattr(saved, k)} -> {getattr(config.model, k)}"
        for k in SHAPE_KEYS + SWITCH_KEYS
        if getattr(saved, k) != getattr(config.model, k)
    ]
    if diffs:
        raise GptkitError(
            f"the config's model shape differs from checkpoint {path} ({', '.join(diffs)}); "
            "resume with the checkpoint's model settings"
        )


def resolve_micro_batch(config: RunConfig, n_params: int, runtime: Runtime) -> int:
    """`auto`: the largest micro-batch whose memory estimate fits in 70% of the free memory and that
    divides the step's tokens, so the global batch is kept through accumulation."""
    mb = config.train.micro_batch_size
    if mb != "auto":
        return int(mb)
    device, precision = runtime.device, runtime.precision
    budget = 0.7 * available_memory(device)
    per_step = config.train.tokens_per_step
    block = config.model.block_size
    fits = [
        b
        for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        if (per_step is None or per_step % (b * block) == 0)
        and sum(memory_estimate(config.model, n_params, b, precision).values()) <= budget
    ] or [1]
    if device.type == "cuda":  # estimates are rough on GPUs: try the candidates, largest first
        best = next((b for b in reversed(fits) if _fits_on_cuda(config, b, runtime)), 1)
    else:
        best = fits[-1]
    notice(f"micro_batch_size=auto: {best} (fits in {budget / 2**30:.1f} GiB, the step keeps its tokens)")
    return best


def _fits_on_cuda(config: RunConfig, micro_batch: int, runtime: Runtime) -> bool:
    """One forward and backward pass at this micro-batch, without running out of memory."""
    model = GPT(config.model).to(runtime.device)
    try:
        x = torch.zeros(micro_batch, config.model.block_size, dtype=torch.long, device=runtime.device)
        with runtime.autocast():
            loss = next_token_loss(model, x, x)
        loss.backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model
        torch.cuda.empty_cache()


def resolve_batch(config: RunConfig, n_params: int, runtime: Runtime) -> RunConfig:
    """The micro-batch ("auto" resolved) and a check of the batch arithmetic, before any work."""
    micro = resolve_micro_batch(config, n_params, runtime)
    config = config.model_copy(update={"train": config.train.model_copy(update={"micro_batch_size": micro})})
    accumulation_steps(config, micro, runtime.procs.world_size)
    return config


def pretraining_parts(
    config: RunConfig,
    procs: Processes,
    device: torch.device,
    path: Path | None,
    payload: dict[str, Any] | None,
) -> Parts:
    """A fresh model (or the resumed one's shape) on prepared token shards, or streamed sources."""
    data: PreparedData | StreamTokenizer
    data = stream_tokenizer(config.data) if config.data.stream else PreparedData.open(config.data.path)
    if payload is not None:  # the tokenizer first: it explains a vocabulary mismatch too
        data.check_tokenizer(from_description(payload["tokenizer"]).fingerprint(), f"checkpoint {path}")
    if config.model.vocab_size is None:
        config = config.model_copy(
            update={"model": config.model.model_copy(update={"vocab_size": data.vocab_size})}
        )
    elif config.model.vocab_size != data.vocab_size:
        raise GptkitError(
            f"model.vocab_size is {config.model.vocab_size} but the data's tokenizer has {data.vocab_size} "
            "ids; leave model.vocab_size unset to take it from the data"
        )
    if payload is not None:
        assert path is not None
        check_same_shape(config, payload, path)

    seed_everything(config.train.seed)
    with torch.device("meta"):
        n_params = GPT(config.model).num_params()
    runtime = resolve_runtime(config.train, config.model, procs, device)
    config = resolve_batch(config, n_params, runtime)
    if isinstance(data, StreamTokenizer):
        source: TokenSource = StreamBatches(
            config.data,
            data.tokenizer(),
            int(config.train.micro_batch_size),
            config.model.block_size,
            config.train.seed,
            procs.rank,
            procs.world_size,
        )
        micro = int(config.train.micro_batch_size)
        tok = data.tokenizer()
        val, why = stream_val_batches(config.data, tok, config.eval.batches, micro, config.model.block_size)
        if val is None:
            notice(why)
        return Parts(config, GPT(config.model), tok, source, val, runtime)
    source, val = shard_sources(config, data, procs)
    return Parts(config, GPT(config.model), data.tokenizer(), source, val, runtime)


def shard_sources(
    config: RunConfig, data: PreparedData, procs: Processes, window: int | None = None
) -> tuple[ShardBatches, list[Batch] | None]:
    """Training windows of this rank (`window` tokens, default the context), and the fixed val
    batches (None if the val split is too short)."""
    micro, block = int(config.train.micro_batch_size), window or config.model.block_size
    source = ShardBatches(
        data.shards("train"),
        micro,
        block,
        config.data.sampling,
        config.train.seed,
        rank=procs.rank,
        world_size=procs.world_size,
        vocab_size=data.vocab_size,
    )
    val = None
    if data.tokens("val") > block:
        val = fixed_batches(data.shards("val"), config.eval.batches, micro, block, data.vocab_size)
    else:
        notice(f"no val loss: the val split of {config.data.path} has fewer than {block + 1} tokens")
    return source, val


def finetune_parts(
    config: RunConfig,
    procs: Processes,
    device: torch.device,
    path: Path | None,
    payload: dict[str, Any] | None,
    load_base: BaseLoader,
) -> Parts:
    """The base model (loaded by `load_base`) made trainable by the method, on instructions or shards."""
    fc = config.finetune
    assert fc.base is not None
    model, tokenizer, base_config, base_path, _ = load_base(fc.base)
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
    runtime = resolve_runtime(config.train, config.model, procs, device)
    config = resolve_batch(config, model.num_params(), runtime)
    micro = int(config.train.micro_batch_size)
    room = model.tokens_that_fit()  # prompt tuning's vectors take part of the context
    if fc.method == "prompt" and config.data.packing and config.data.instructions is not None:
        notice("prompt tuning pads examples (data.packing=false): each example gets its own soft prompt")
        config = config.model_copy(update={"data": config.data.model_copy(update={"packing": False})})
    extra = {}
    if config.data.instructions is not None:
        train, held_out, chat_template = load_instructions(config, tokenizer, room)
        source: Any = InstructionBatches(
            train, micro, room, config.data.packing, config.data.seed, procs.rank, procs.world_size
        )
        val = val_batches(held_out, micro, room, config.data.packing, config.eval.batches)
        extra["chat_template"] = chat_template.to_dict()  # instruction tuning: chat uses it
    elif config.data.stream:
        raise GptkitError(
            "gptkit finetune does not stream (data.stream=true); prepare the sources with gptkit prepare "
            "and set data.path, or give data.instructions"
        )
    else:  # continued pre-training on prepared shards
        data = PreparedData.open(config.data.path)
        data.check_tokenizer(tokenizer.fingerprint(), f"base model {base_path}")
        source, val = shard_sources(config, data, procs, window=room)
    notice(f"{model.num_params(trainable=True):,} trainable parameters of {model.num_params():,}")
    finish = _save_adapter(fc, base_path) if fc.method == "lora" else None
    return Parts(config, model, tokenizer, source, val, runtime, "finetune", extra, finish)


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


def _save_adapter(fc: FinetuneConfig, base_path: Path) -> Callable[[Trainer], None]:
    def finish(trainer: Trainer) -> None:
        out = lora.save_adapter(
            trainer.model, trainer.run_dir / lora.ADAPTER_DIR, fc.lora, base=str(base_path)
        )
        notice(f"LoRA adapter: {out} (peft layout; gptkit.finetuning.lora.load_adapter or peft load it)")

    return finish
