"""`gptkit train` and `gptkit finetune`: from a config to a running Trainer — run folder, resume, parts.

The command decides the mode: pre-training's parts, or fine-tuning's from a base model its caller
loads (`training.parts`). Every check that can fail runs before the first step: the data folder,
its tokenizer, the model shape against a checkpoint's, the batch arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from gptkit.checkpoint import (
    earlier_run_files,
    load_checkpoint,
    newest_intact,
    remove_orphan_temporaries,
    run_of,
    step_files,
)
from gptkit.config import RunConfig
from gptkit.console import notice, set_quiet
from gptkit.errors import GptkitError, os_error
from gptkit.locks import hold
from gptkit.runtime import Processes, from_environment, process_device
from gptkit.tracking import check_installed
from gptkit.training import distributed
from gptkit.training.parts import BaseLoader, Parts, TaskEvaluator, finetune_parts, pretraining_parts
from gptkit.training.trainer import Trainer, TrainResult


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
        path, payload = newest_intact(run_dir, resuming=True)
    else:
        path = Path(resume)
        if path.is_dir():
            path, payload = newest_intact(path, resuming=True)
        else:
            payload = load_checkpoint(path)
        newer = [p for s, p in step_files(run_dir) if s > payload["progress"]["step"]]
        if newer and run_of(path) == run_dir.resolve():
            raise GptkitError(
                f"run {str(run_dir)!r} has checkpoints newer than {path.name} ({newer[-1].name}); to branch "
                "from an older checkpoint, give the run a new name (name=...)"
            )
    notice(f"resuming from {path} (step {payload['progress']['step']})")
    return path, payload


def check_mode(config: RunConfig, finetuning: bool) -> None:
    """The command names the mode; a config meant for the other command is refused, not reinterpreted."""
    if finetuning and config.finetune.base is None:
        raise GptkitError(
            "finetune.base is not set; name the model to start from: a run folder, checkpoint or "
            "HuggingFace GPT-2 folder (e.g. finetune.base=runs/tiny), or pre-train with gptkit train"
        )
    if not finetuning and config.finetune.base is not None:
        raise GptkitError(
            f"finetune.base is set ({config.finetune.base}): fine-tune with gptkit finetune "
            "(gptkit.finetune), or unset finetune.base to pre-train"
        )


def train(
    config: RunConfig,
    config_path: str | Path | None = None,
    resume: str | None = None,
    stop_at: int | None = None,
    *,
    load_base: BaseLoader | None = None,
    tasks: TaskEvaluator | None = None,
) -> TrainResult:
    """Pre-train a GPT on prepared shards as the config says, or with `load_base` fine-tune the
    base it loads (`finetune.base`); returns what the run reached. `tasks` runs `eval.tasks`.

    `stop_at` ends this process at that step with a checkpoint, keeping max_steps' schedule, so that
    a long run can be done in slices (`--resume latest` continues it).
    """
    check_mode(config, finetuning=load_base is not None)
    if config.eval.tasks and tasks is None:
        raise ValueError("eval.tasks is set: pass the task evaluator (gptkit.eval.run.TrainingTasks)")
    check_installed(config)  # a missing tracker package stops the run before anything is written
    procs = from_environment(config.train.distributed)
    set_quiet(not procs.main)
    warn_long_warmup(config)
    try:
        device = process_device(config.train.device, procs)
        distributed.start(procs, device, config.train.dist_timeout_minutes)
        name = run_name(config, config_path)
        config = config.model_copy(update={"name": name})  # so the saved config.yaml resumes the same run
        run_dir = Path(config.runs_dir) / name
        with run_lock(run_dir, procs, device):
            path, payload = find_resume(run_dir, resume)
            start = payload["progress"].get("step", 0) if payload is not None and payload.get("state") else 0
            if stop_at is not None and stop_at <= start:
                raise GptkitError(
                    f"--stop-at {stop_at} is not after the step training starts from ({start}); "
                    "give a later step"
                )
            if load_base is not None:
                parts = finetune_parts(config, procs, device, path, payload, load_base)
            else:
                parts = pretraining_parts(config, procs, device, path, payload)
            parts.tasks = tasks
            run_dir.mkdir(parents=True, exist_ok=True)
            return run_parts(parts, run_dir, name, payload, stop_at)
    finally:
        distributed.stop()


def warn_long_warmup(config: RunConfig) -> None:
    """Warm-up longer than the run: the learning rate never reaches train.lr (say so before step 1)."""
    t = config.train
    if t.warmup_steps > t.max_steps:
        notice(
            f"warning: train.warmup_steps ({t.warmup_steps}) exceeds train.max_steps ({t.max_steps}): "
            f"the learning rate never reaches train.lr ({t.lr:g}); set e.g. "
            f"train.warmup_steps={t.max_steps // 10}"
        )


def run_parts(
    parts: Parts, run_dir: Path, name: str, payload: dict[str, Any] | None, stop_at: int | None
) -> TrainResult:
    trainer = Trainer(parts, run_dir, name, resume=payload)
    result = trainer.run(stop_at)
    if parts.finish is not None and parts.runtime.procs.main and not result.stopped_early:
        parts.finish(trainer)
    return result


@contextmanager
def run_lock(run_dir: Path, procs: Processes, device: torch.device) -> Iterator[None]:
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
        (failed,) = distributed.any_rank([error is not None], procs, device)
        if error is not None:
            raise error
        if failed:
            raise GptkitError(f"rank 0 could not lock run folder {str(run_dir)!r}")
        if procs.main:
            for orphan in remove_orphan_temporaries(run_dir):
                notice(f"removed {orphan}, left by a killed run")
        yield
