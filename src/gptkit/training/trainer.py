"""The one training loop. Pre-training and fine-tuning both run it.

A `Trainer` composes separate parts: a model, a `TokenSource` of training batches, fixed
validation batches, an optimiser with its schedule, and the run's checkpoints. Everything a
resume needs goes through `_state()` into one checkpoint, so that N steps, a stop, and N more
give the same losses and weights as 2N steps in one go.
"""

from __future__ import annotations

import errno
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gptkit.checkpoint import RunCheckpoints, step_files
from gptkit.config import RunConfig, to_yaml
from gptkit.console import notice
from gptkit.data.mixing import SourceExhausted
from gptkit.device import autocast, fast_matmul
from gptkit.errors import GptkitError
from gptkit.fused_loss import IGNORE_INDEX, next_token_loss
from gptkit.generate import Sampler, SampleSettings
from gptkit.layout import CONFIG_FILE
from gptkit.training import distributed
from gptkit.training.budget import (
    available_memory,
    flops_per_token,
    format_bytes,
    matmul_ceiling,
    memory_estimate,
)
from gptkit.training.optim import learning_rate, make_optimizer, set_learning_rate
from gptkit.training.recompute import recompute_blocks
from gptkit.training.report import write_report
from gptkit.training.runlog import QuietLog, RunLog
from gptkit.training.signals import StopRequest

if TYPE_CHECKING:
    from gptkit.training.parts import Parts

# Save errors that training survives (the next save may fit), with what frees the way
FULL = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space or raise the disk quota",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    train_losses: list[float] = field(default_factory=list)  # one per step run in this process
    val_loss: float | None = None
    best_val_loss: float | None = None
    samples: dict[str, str] = field(default_factory=dict)  # the last ones, by prompt
    checkpoint: Path | None = None
    stopped_early: bool = False
    main: bool = True  # rank 0, which speaks for all processes of a multi-process run


def rng_state() -> dict[str, Any]:
    """Every global generator, as plain data (tensors, ints, lists) so checkpoints load weights-only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(state: dict[str, Any]) -> bool:
    """No NaN or inf in any floating-point tensor of a state dict."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs optimiser steps until `config.train.max_steps` or a stop request."""

    def __init__(
        self, parts: Parts, run_dir: Path, run_name: str, resume: dict[str, Any] | None = None
    ) -> None:
        config, model = parts.config, parts.model
        self.parts = parts
        self.config, self.run_dir, self.run_name = config, run_dir, run_name
        self.tokenizer, self.train_source, self.val_batches = parts.tokenizer, parts.source, parts.val
        tc = config.train
        self.runtime = parts.runtime
        self.procs = procs = parts.runtime.procs
        self.device, self.precision = parts.runtime.device, parts.runtime.precision
        self.model = model.to(self.device)
        self.micro_batch = int(tc.micro_batch_size)  # resolved from "auto" by the caller
        self.accum = accumulation_steps(config, self.micro_batch, procs.world_size)
        self.tokens_per_step = self.micro_batch * config.model.block_size * self.accum * procs.world_size
        self.step_positions = self.tokens_per_step  # what the last step computed (padding: fewer)
        # DDP wraps the model; fully_shard (FSDP) shards self.model in place, before the optimiser
        # is made, so that it holds the shards.
        if tc.activation_checkpointing:
            recompute_blocks(self.model)
        self.step_model = distributed.wrap(self.model, procs, self.device)
        self.optimizer = make_optimizer(self.model, tc, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if tc.compile:
            self.step_model = torch.compile(self.step_model)
        self.checkpoints = RunCheckpoints(run_dir, config.checkpoint.keep_last)
        self.n_params = self.model.num_params()
        self.step, self.tokens, self.wall_seconds, self.bad_steps = 0, 0, 0.0, 0
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_samples: dict[str, str] = {}
        self._val_step = -1  # the step the last val loss was measured at
        # the data position and generators at the start of the step under way (None between steps and
        # once the update is applied): an error before the update rolls back to them, so that the
        # emergency checkpoint it writes resumes exactly
        self._step_start: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._saving = False
        self.diverging = False  # the last step's loss or gradient was NaN/inf (not an fp16 overflow)
        if resume is not None:
            self._restore(resume)
        self._saved_step = self.step  # the newest step a checkpoint holds (or the start)

    # -- state ---------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        """Everything a resume needs, as plain data for one checkpoint file (complete on rank 0).

        Model and optimiser states are full (unsharded) and keyed by parameter name, whatever the
        number of processes, so any number of processes can resume them. Each rank's random
        generators are kept: they draw dropout masks.
        """
        model_state, optim_state = distributed.full_state(self.model, self.optimizer, self.procs)
        rng = distributed.gather(rng_state(), self.procs)
        data = self.train_source.state_dict()  # the same on every rank
        return {
            **self.parts.checkpoint_extra,
            "model_state": model_state,
            "config": self.config.model_dump(mode="json"),
            "tokenizer": self.tokenizer.describe(),
            "progress": {
                "step": self.step,
                "tokens": self.tokens,
                "wall_seconds": self.wall_seconds,
                "best_val_loss": self.best_val_loss,
                "val_loss": self.last_val_loss,
            },
            "state": {
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict(),
                "data": data,
                "rng": rng[0],
                "rng_ranks": rng,
                "bad_steps": self.bad_steps,
            },
        }

    def _restore(self, payload: dict[str, Any]) -> None:
        if not payload.get("state"):  # weights only (gptkit import, export safetensors)
            distributed.load_full_state(self.model, self.optimizer, payload["model"], None)
            self.step = self.tokens = 0
            if self.procs.main:
                notice(
                    "the checkpoint holds weights only: training starts from them at step 0, with a "
                    "fresh optimiser, data order and schedule"
                )
            return
        state, progress = payload["state"], payload["progress"]
        distributed.load_full_state(self.model, self.optimizer, payload["model"], state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.train_source.load_state_dict(state["data"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        set_rng_state(ranks[self.procs.rank] if self.procs.rank < len(ranks) else ranks[0])
        self.bad_steps = state["bad_steps"]
        self.step, self.tokens = progress["step"], progress["tokens"]
        self.wall_seconds = progress["wall_seconds"]
        self.best_val_loss, self.last_val_loss = progress["best_val_loss"], progress["val_loss"]

    def save(self, reason: str) -> Path | None:
        """Save a checkpoint (every rank gathers, rank 0 writes); a full disk is reported, and the
        previous checkpoint stays usable. Never one whose last loss or whose weights are NaN/inf:
        resuming from it could only diverge again."""
        self._saving = True
        folder = self.checkpoints.folder
        try:
            state = self._state()
            if not self.procs.main:
                return None
            if self.diverging or not all_finite(state["model_state"]):
                what = "its last loss or gradient" if self.diverging else "its weights"
                notice(f"not saving the {reason} checkpoint at step {self.step}: {what} are NaN/inf")
                return None
            path = self.checkpoints.save(self.step, val_loss=self.last_val_loss_if_fresh(), **state)
        except OSError as e:
            if e.errno not in FULL:
                raise GptkitError(
                    f"could not save the {reason} checkpoint at step {self.step} in {str(folder)!r}: "
                    f"{e.strerror or e}; earlier checkpoints there stay usable"
                ) from None
            cause = os.strerror(e.errno).lower()
            notice(
                f"could not save the {reason} checkpoint at step {self.step}: {cause}; "
                f"earlier checkpoints in {folder} stay usable; {FULL[e.errno]} to save the next one"
            )
            return None
        finally:
            self._saving = False
        self._saved_step = self.step
        return path

    def _save_after_error(self) -> None:
        """An error ends the run: keep the steps done since the last checkpoint, as SIGINT does.

        An error inside a step, before its update, rolls the data position and generators back to
        the step's start, so the checkpoint is the previous step's exactly. Not with several
        processes (saving gathers from every rank, and the others may not be there to answer)."""
        self._roll_back_step()
        if self._saving or self.procs.distributed or self.step == self._saved_step:
            return
        try:
            path = self.save("emergency")
        except Exception as e:  # the run's error is the one to report; this one is said in passing
            notice(f"could not save an emergency checkpoint at step {self.step}: {e}")
            return
        if path is not None:
            notice(
                f"saved an emergency checkpoint before stopping: {path} (step {self.step}); once the "
                f"error below is fixed, resume with: {self.resume_command()}"
            )

    def _roll_back_step(self) -> None:
        """Put the data position and generators back to the start of the step under way, if any."""
        if self._step_start is not None:
            data, rng = self._step_start
            self.train_source.load_state_dict(data)
            set_rng_state(rng)
            self.optimizer.zero_grad(set_to_none=True)
            self._step_start = None

    def last_val_loss_if_fresh(self) -> float | None:
        """The val loss counts for 'best' only on the step it was measured."""
        return self.last_val_loss if self._val_step == self.step else None

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train to max_steps; `stop_at` pauses earlier (checkpoint and exit), as a signal would."""
        tc = self.config.train
        main = self.procs.main
        self._check_inputs()
        self._print_budget()
        if main:
            (self.run_dir / CONFIG_FILE).write_text(to_yaml(self.config))
        # MFU compares all processes' tokens with all processes' ceilings (each measures its own)
        ceiling = sum(distributed.gather(matmul_ceiling(self.device.type, self.precision), self.procs))
        together = f" of {self.procs.world_size} processes together" if self.procs.distributed else ""
        notice(f"MFU against {ceiling / 1e12:.4g} TFLOP/s, the measured matmul ceiling{together}")
        flops_token = flops_per_token(self.config.model, self.n_params)
        log: RunLog | QuietLog = (
            RunLog(self.run_dir, self.config, self.run_name, self.step, tc.max_steps) if main else QuietLog()
        )
        result = TrainResult(self.run_dir, self.step, self.tokens, main=main)
        last_save = time.monotonic()
        stopped = False
        exhausted: str | None = None
        try:
            with StopRequest() as stop, fast_matmul(self.device):
                self.model.train()
                while self.step < tc.max_steps:
                    t0 = time.perf_counter()
                    try:
                        loss, grad_norm, lr = self.train_step()
                    except SourceExhausted as e:  # data.when_exhausted=stop: the data ends the run
                        self._roll_back_step()
                        exhausted = str(e)
                        break
                    dt = time.perf_counter() - t0
                    result.train_losses.append(loss)
                    tps = self.step_positions / dt
                    log.train(
                        self.step,
                        {
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens_per_sec": tps,
                            "mfu": flops_token * tps / ceiling,
                            "tokens": self.tokens,
                            **self._data_shares(),
                        },
                    )
                    every = self.config.eval.every
                    if (every and self.step % every == 0) or self.step == tc.max_steps:
                        self.evaluate(log)
                    # every rank must take these decisions together (saving gathers from all ranks)
                    save_due, stop.requested = distributed.any_rank(
                        [self._checkpoint_due(last_save), stop.requested], self.procs, self.device
                    )
                    if save_due or stop.requested:
                        self.save("emergency" if stop.requested else "periodic")
                        last_save = time.monotonic()
                    self.wall_seconds += time.perf_counter() - t0  # the step, its eval and its save
                    if stop_at is not None and self.step >= stop_at and self.step < tc.max_steps:
                        stop.requested = True
                        self.save("requested")
                    if stop.requested:
                        stopped = True
                        break
                if not stopped and self._val_step != self.step:
                    self.evaluate(log)
                if not stopped:
                    result.checkpoint = self.save("final")
        except Exception:
            self._save_after_error()
            raise
        finally:
            log.close("stopped" if stopped else None)  # None: "failed" if an exception is on its way
        result.step, result.tokens = self.step, self.tokens
        result.val_loss, result.best_val_loss = self.last_val_loss, self.best_val_loss
        result.stopped_early = stopped
        result.samples = self.last_samples
        if main:
            self._report(stopped, exhausted)
        if exhausted:
            notice(f"{exhausted}; the run ends at step {self.step}")
        if stopped:
            notice(f"stopped at step {self.step}; resume with: {self.resume_command()}")
        return result

    def train_step(self) -> tuple[float, float, float]:
        """One optimiser step over `accum` micro-batches; returns (loss, pre-clip grad norm, lr)."""
        tc = self.config.train
        lr = learning_rate(self.step, tc)
        set_learning_rate(self.optimizer, lr)
        self._step_start = (self.train_source.state_dict(), rng_state())
        # The step's micro-batches first (ids: cheap to hold): the loss is the mean over all targets
        # of the global batch, so each micro-batch needs the count of them all. Each gives its sum
        # of token losses / (count / world size): DDP and FSDP average the ranks' gradients, which
        # makes the world size cancel. Padding and masked prompts (IGNORE_INDEX) count for nothing,
        # and how the batch is cut into micro-batches and ranks changes nothing.
        batches = [self.train_source.next_batch() for _ in range(self.accum)]
        targets, positions = distributed.total_counts(
            [
                sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches),
                sum(b.ids.numel() for b in batches),  # computed: padded batches are narrower than T
            ],
            self.procs,
            self.device,
        )
        divisor = max(targets, 1) / self.procs.world_size
        total = torch.zeros((), device=self.device)
        for micro, batch in enumerate(batches):
            batch = batch.to(self.device, non_blocking=True)
            with distributed.gradient_sync(self.step_model, self.procs, sync=micro == self.accum - 1):
                with autocast(self.device, self.precision):
                    loss = next_token_loss(  # fused with the head: no logits kept
                        self.model,
                        batch.ids,
                        batch.targets,
                        batch.layout(),
                        step=self.step_model,
                        divisor=divisor,
                    )
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        loss = float(distributed.mean(total, self.procs))  # the global batch's mean over its targets
        self.step_positions = positions  # over all ranks
        self._step_start = None
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.scaler.step(self.optimizer)
            self.bad_steps = 0
            self.diverging = False
        else:
            self._bad_step(loss, grad_norm)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.step_positions
        return loss, grad_norm, lr

    def _bad_step(self, loss: float, grad_norm: float) -> None:
        """Skip an update whose loss or gradient is NaN/inf; give up after too many in a row."""
        self.bad_steps += 1
        limit = self.config.train.max_bad_steps
        if self.precision == "fp16" and math.isfinite(loss):
            return  # the gradient scaler found an overflow; it lowers its scale and this is normal
        self.diverging = True
        notice(f"step {self.step + 1}: loss {loss}, grad norm {grad_norm}: skipping this update")
        if self.bad_steps >= limit:
            first = self.step + 2 - self.bad_steps
            fix = "lower train.lr, raise train.warmup_steps or use train.precision=fp32"
            # the weights after step first-1 gave the first NaN: only checkpoints before them are sound
            sound = [path for step, path in step_files(self.run_dir) if step <= first - 2]
            if sound:
                how = (
                    f"{fix}, and resume from the newest checkpoint before them under a new run name: "
                    f"gptkit {self.parts.command} {self.run_dir / 'config.yaml'} --resume {sound[-1]} "
                    "name=NEW_NAME"
                )
            else:
                how = f"no checkpoint precedes them: {fix}, and start again under a new run name (name=...)"
            raise GptkitError(
                f"{self.bad_steps} steps in a row had NaN/inf loss or gradients (steps {first} to "
                f"{self.step + 1}); {how}"
            )

    def _check_inputs(self) -> None:
        """What the first evaluation would read, checked before step 1: an error there would
        otherwise end the run after the work of the steps before it."""
        ec = self.config.eval
        if ec.sample_tokens:
            for i, prompt in enumerate(ec.prompts):
                try:
                    if not self.tokenizer.encode(prompt):
                        raise GptkitError("it is empty")
                except GptkitError as e:
                    raise GptkitError(
                        f"eval.prompts[{i}] {prompt!r} cannot be sampled from: {e}; change eval.prompts, "
                        "or set eval.sample_tokens=0 for no samples"
                    ) from None
        if self.parts.tasks is not None:
            self.parts.tasks.check()

    @torch.no_grad()
    def evaluate(self, log: RunLog | QuietLog) -> None:
        """Val loss on the fixed batches, and samples from the configured prompts."""
        metrics: dict[str, float] = {}
        if self.val_batches:
            self.model.eval()
            losses = []
            for batch in self.val_batches:
                batch = batch.to(self.device)
                with autocast(self.device, self.precision):
                    loss = next_token_loss(self.model, batch.ids, batch.targets, batch.layout())
                losses.append(float(loss))
            self.model.train()
            self.last_val_loss = sum(losses) / len(losses)
            self._val_step = self.step
            if self.best_val_loss is None or self.last_val_loss < self.best_val_loss:
                self.best_val_loss = self.last_val_loss
            metrics = {"val_loss": self.last_val_loss, "val_ppl": math.exp(min(self.last_val_loss, 50.0))}
        ec = self.config.eval
        if self.parts.tasks is not None:  # zero-shot tasks, as gptkit eval scores them; every rank runs them
            self.model.eval()
            with autocast(self.device, self.precision):
                block = self.model.tokens_that_fit()  # a soft prompt's vectors take part of the context
                metrics.update(self.parts.tasks.metrics(self.model, self.tokenizer, block, self.device))
            self.model.train()
        samples = {}
        if ec.sample_tokens:
            sampler = Sampler(self.model, self.tokenizer)
            for i, prompt in enumerate(ec.prompts):
                settings = SampleSettings.of(
                    max_new_tokens=ec.sample_tokens,
                    temperature=ec.temperature,
                    top_k=ec.top_k,
                    seed=self.config.train.seed + i,  # fixed per prompt: changes show learning
                )
                with autocast(self.device, self.precision):
                    samples[prompt] = sampler.generate([prompt], settings)[0][0]
            self.last_samples = samples
        log.eval(self.step, metrics, samples)

    def _checkpoint_due(self, last_save: float) -> bool:
        cc = self.config.checkpoint
        by_steps = cc.every_steps > 0 and self.step % cc.every_steps == 0
        by_time = cc.every_minutes > 0 and time.monotonic() - last_save >= 60 * cc.every_minutes
        fresh_best = self._val_step == self.step and self.last_val_loss == self.best_val_loss
        return (by_steps or by_time or fresh_best) and self.step < self.config.train.max_steps

    # -- messages ------------------------------------------------------------------------------

    def resume_command(self) -> str:
        cmd = f"gptkit {self.parts.command} {self.run_dir / 'config.yaml'} --resume latest"
        if self.procs.distributed:
            cmd = f"torchrun --nproc_per_node={self.procs.world_size} -m {cmd}"
        return cmd

    def _print_budget(self) -> None:
        est = memory_estimate(self.config.model, self.n_params, self.micro_batch, self.precision)
        total = sum(est.values())
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.items())
        notice(
            f"{self.run_name}: {self.n_params / 1e6:.2f}M parameters on {self.device} ({self.precision}); "
            f"micro-batch {self.micro_batch} x {self.config.model.block_size} tokens, {self.accum} "
            f"accumulation step(s), {self.tokens_per_step:,} tokens per step"
        )
        free = format_bytes(available_memory(self.device))
        notice(f"memory estimate: {format_bytes(total)} ({parts}); {free} free")

    def _data_shares(self) -> dict[str, float]:
        """A streamed mixture's share of the tokens per source so far (rank 0's part), as share/NAME."""
        shares = getattr(self.train_source, "shares", None)
        return {f"share/{name}": share for name, share in shares().items()} if shares else {}

    def _report(self, stopped: bool, exhausted: str | None = None) -> None:
        seconds = self.wall_seconds
        status = "stopped early (emergency checkpoint)" if stopped else "finished"
        write_report(
            self.run_dir,
            {
                "run_name": self.run_name,
                "status": status,
                "stop_reason": exhausted,
                "resume_command": self.resume_command() if stopped else None,
                "config": self.config.model_dump(mode="json"),
                "params": self.n_params,
                "trainable_params": self.model.num_params(trainable=True),
                "tokenizer": self.tokenizer.kind,
                "device": str(self.device),
                "precision": self.precision,
                "micro_batch_size": self.micro_batch,
                "grad_accum": self.accum,
                "tokens_per_step": self.tokens_per_step,
                "steps": self.step,
                "tokens": self.tokens,
                "wall_seconds": seconds,
                "tokens_per_sec": self.tokens / seconds if seconds else None,
                "best_val_loss": self.best_val_loss,
                "samples": self.last_samples,
                "data_shares": self._data_shares() or None,
            },
        )


def accumulation_steps(config: RunConfig, micro_batch: int, world_size: int = 1) -> int:
    """Micro-batches per optimiser step so that each step sees `train.tokens_per_step` tokens."""
    per_micro = micro_batch * config.model.block_size * world_size
    wanted = config.train.tokens_per_step
    if wanted is None:
        return 1
    if wanted % per_micro:
        raise GptkitError(
            f"train.tokens_per_step ({wanted}) is not a multiple of micro-batch x block_size"
            f"{' x processes' if world_size > 1 else ''} ({per_micro}); choose a multiple such as "
            f"{max(1, round(wanted / per_micro)) * per_micro}"
        )
    return wanted // per_micro
