"""`gptkit train`: from a config to a running Trainer — data, model, run folder, resume.

Every check that can fail runs here, before the first step: the data folder, its tokenizer, the
model shape against a checkpoint's, the batch arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptkit.checkpoint import load_checkpoint
from gptkit.config import RunConfig, validate
from gptkit.console import notice, set_quiet
from gptkit.data.batch import Batch
from gptkit.data.shards import PreparedData
from gptkit.device import pick_device, pick_precision
from gptkit.errors import GptkitError, os_error
from gptkit.files import remove_orphans
from gptkit.fused_loss import next_token_loss
from gptkit.locks import hold
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer, from_description
from gptkit.training import distributed
from gptkit.training.batches import ShardBatches, TokenSource, fixed_batches
from gptkit.training.budget import available_memory, memory_estimate
from gptkit.training.checkpoints import earlier_run_files, load_latest, step_files
from gptkit.training.trainer import Trainer, TrainResult, accumulation_steps, seed_everything

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "pad_vocab_multiple")


def run_name(config: RunConfig, config_path: str | Path | None) -> str:
    if config.name:
        return config.name
    if config_path is not None:
        stem = Path(config_path).stem
        return "run" if stem == "config" else stem
    return "run"


def find_resume(run_dir: Path, resume: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """`latest`: the run's newest intact checkpoint; a path: that checkpoint; None: a fresh run;
    `auto`: latest if the run has checkpoints, else a fresh run (a requeued cluster job)."""
    if resume == "auto":  # a requeued job that died before its first checkpoint is redone
        if not step_files(run_dir):
            return None, None
        resume = "latest"
    if resume is None:
        if step_files(run_dir):
            raise GptkitError(
                f"run folder {str(run_dir)!r} already holds checkpoints; continue it with --resume latest, "
                "or choose another run name (name=...)"
            )
        if found := earlier_run_files(run_dir):
            raise GptkitError(
                f"run folder {str(run_dir)!r} holds an earlier run's {', '.join(found)} but no checkpoint "
                "to continue from; move the folder away or choose another run name (name=...)"
            )
        return None, None
    if resume == "latest":
        path, payload = load_latest(run_dir)
    else:
        path = Path(resume)
        if path.is_dir():
            path, payload = load_latest(path)
        else:
            payload = load_checkpoint(path)
        newer = [p for s, p in step_files(run_dir) if s > payload["progress"]["step"]]
        if newer and path.parent.parent.resolve() == run_dir.resolve():
            raise GptkitError(
                f"run {str(run_dir)!r} has checkpoints newer than {path.name} ({newer[-1].name}); to branch "
                "from an older checkpoint, give the run a new name (name=...)"
            )
    notice(f"resuming from {path} (step {payload['progress']['step']})")
    return path, payload


def check_same_shape(config: RunConfig, payload: dict[str, Any], path: Path) -> None:
    saved = validate(RunConfig, payload["config"], f"checkpoint {path}").model
    diffs = [
        f"{k} {getattr(saved, k)} -> {getattr(config.model, k)}"
        for k in SHAPE_KEYS
        if getattr(saved, k) != getattr(config.model, k)
    ]
    if diffs:
        raise GptkitError(
            f"the config's model shape differs from checkpoint {path} ({', '.join(diffs)}); "
            "resume with the checkpoint's model settings"
        )


def resolve_micro_batch(config: RunConfig, n_params: int) -> int:
    """`auto`: the largest micro-batch whose memory estimate fits in 70% of the free memory and that
    divides the step's tokens, so the global batch is kept through accumulation."""
    mb = config.train.micro_batch_size
    if mb != "auto":
        return int(mb)
    device = pick_device(config.train.device)
    precision = pick_precision(config.train.precision, device, config.model)
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
        best = next((b for b in reversed(fits) if _fits_on_cuda(config, b, device, precision)), 1)
    else:
        best = fits[-1]
    notice(f"micro_batch_size=auto: {best} (fits in {budget / 2**30:.1f} GiB, the step keeps its tokens)")
    return best


def _fits_on_cuda(config: RunConfig, micro_batch: int, device: torch.device, precision: str) -> bool:
    """One forward and backward pass at this micro-batch, without running out of memory."""
    from gptkit.device import autocast

    model = GPT(config.model).to(device)
    try:
        x = torch.zeros(micro_batch, config.model.block_size, dtype=torch.long, device=device)
        with autocast(device, precision):
            loss = next_token_loss(model, x, x)
        loss.backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model
        torch.cuda.empty_cache()


def train(
    config: RunConfig,
    config_path: str | Path | None = None,
    resume: str | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Pre-train a GPT on prepared shards as the config says; returns what the run reached.

    `stop_at` ends this process at that step with a checkpoint, keeping max_steps' schedule, so that
    a long run can be done in slices (`--resume latest` continues it).
    """
    procs = distributed.from_environment(config.train.distributed)
    set_quiet(not procs.main)
    try:
        distributed.start(
            procs,
            pick_device(config.train.device, procs.local_rank if procs.distributed else None),
            config.train.dist_timeout_minutes,
        )
        return _train(config, config_path, resume, stop_at, procs)
    finally:
        distributed.stop()


@dataclass
class Parts:
    """What a Trainer is built from; pre-training and fine-tuning each make a set."""

    config: RunConfig  # resolved: vocabulary, micro-batch
    model: GPT
    tokenizer: Tokenizer
    source: TokenSource
    val: list[Batch] | None
    chat_template: dict[str, Any] | None = None
    finish: Callable[[Trainer], None] | None = None  # after the last step, on rank 0 (e.g. save an adapter)


def _train(
    config: RunConfig,
    config_path: str | Path | None,
    resume: str | None,
    stop_at: int | None,
    procs: distributed.Processes,
) -> TrainResult:
    name = run_name(config, config_path)
    config = config.model_copy(update={"name": name})  # so the saved config.yaml resumes the same run
    run_dir = Path(config.runs_dir) / name
    with run_lock(run_dir, procs, config):
        return _train_locked(config, run_dir, name, resume, stop_at, procs)


@contextmanager
def run_lock(run_dir: Path, procs: distributed.Processes, config: RunConfig) -> Iterator[None]:
    """The run folder is this process's for the whole run (rank 0 holds the lock for all ranks, and
    every rank learns whether it got it, so none waits for a rank that gave up); temporaries that
    killed runs left are removed once it is held."""
    if run_dir.exists() and not run_dir.is_dir():
        raise GptkitError(
            f"run folder {str(run_dir)!r} is a file; choose another run name (name=...) or runs_dir"
        )
    with ExitStack() as stack:
        error: GptkitError | None = None
        if procs.main:
            try:
                stack.enter_context(hold(run_dir, f"run folder {str(run_dir)!r}"))
            except GptkitError as e:
                error = e
            except OSError as e:
                error = os_error(e, "write the run folder's lock")
        device = pick_device(config.train.device, procs.local_rank if procs.distributed else None)
        (failed,) = distributed.any_rank([error is not None], procs, device)
        if error is not None:
            raise error
        if failed:
            raise GptkitError(f"rank 0 could not lock run folder {str(run_dir)!r}")
        if procs.main:
            for orphan in remove_orphans(run_dir) + remove_orphans(run_dir / "checkpoints"):
                notice(f"removed {orphan}, left by a killed run")
        yield


def _train_locked(
    config: RunConfig,
    run_dir: Path,
    name: str,
    resume: str | None,
    stop_at: int | None,
    procs: distributed.Processes,
) -> TrainResult:
    path, payload = find_resume(run_dir, resume)
    start = payload["progress"].get("step", 0) if payload is not None and payload.get("state") else 0
    if stop_at is not None and stop_at <= start:
        raise GptkitError(
            f"--stop-at {stop_at} is not after the step training starts from ({start}); give a later step"
        )
    if config.finetune.base is not None:
        from gptkit.finetuning.setup import finetune_parts

        parts = finetune_parts(config, procs, path, payload)
    else:
        parts = pretraining_parts(config, procs, path, payload)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        parts.config,
        run_dir,
        name,
        parts.model,
        parts.tokenizer,
        parts.source,
        parts.val,
        resume=payload,
        procs=procs,
        chat_template=parts.chat_template,
    )
    result = trainer.run(stop_at)
    if parts.finish is not None and procs.main and not result.stopped_early:
        parts.finish(trainer)
    return result


def resolve_batch(config: RunConfig, n_params: int, procs: distributed.Processes) -> RunConfig:
    """The micro-batch ("auto" resolved) and a check of the batch arithmetic, before any work."""
    micro = resolve_micro_batch(config, n_params)
    config = config.model_copy(update={"train": config.train.model_copy(update={"micro_batch_size": micro})})
    accumulation_steps(config, micro, procs.world_size)
    return config


def pretraining_parts(
    config: RunConfig, procs: distributed.Processes, path: Path | None, payload: dict[str, Any] | None
) -> Parts:
    """A fresh model (or the resumed one's shape) on prepared token shards."""
    data = PreparedData.open(config.data.path)
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
    config = resolve_batch(config, n_params, procs)
    source, val = shard_sources(config, data, procs)
    return Parts(config, GPT(config.model), data.tokenizer(), source, val)


def shard_sources(
    config: RunConfig, data: PreparedData, procs: distributed.Processes, window: int | None = None
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
