"""A run's logging: metrics.jsonl, the progress bar, samples.md, loss.png, and optional trackers.

metrics.jsonl is the run's record; everything else (TensorBoard, MLflow, W&B) is a copy of it.
One JSON object per line, written every `log.every` train steps and at every evaluation:

    {"step": 100, "split": "train", "loss": 2.31, "lr": 0.0006, "grad_norm": 0.9, ..., "time": 1.7e9}
    {"step": 100, "split": "val", "val_loss": 2.45, "val_ppl": 11.6, "time": 1.7e9}

`step` counts optimiser steps done (1-based), `time` is Unix time, and NaN/inf values are written
as null so that every line is strict JSON.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tqdm import tqdm

from gptkit.config import RunConfig
from gptkit.console import notice
from gptkit.files import write_atomic
from gptkit.layout import LOSS_PNG, METRICS_FILE, SAMPLES_FILE
from gptkit.tracking import MLflowTracker, Status, TensorBoardTracker, WandbTracker, markdown_code

NO_PROGRESS_ENV = "GPTKIT_NO_PROGRESS"  # 1: no progress bar (tests, scripts)


# ---------------------------------------------------------------------------------------------
# Files


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped, not fatal."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def sample_sections(text: str) -> list[tuple[int | None, str]]:
    """samples.md as (step, section) pairs; a `## step N` line inside a fenced sample is not a heading."""
    sections: list[tuple[int | None, list[str]]] = [(None, [])]
    fence: str | None = None
    for line in text.splitlines(keepends=True):
        if fence is None:
            opening = re.match(r"(`{3,})", line)
            heading = re.fullmatch(r"## step (\d+)\s*", line)
            if opening:
                fence = opening.group(1)
            elif heading:
                sections.append((int(heading.group(1)), []))
        elif re.fullmatch(rf"{fence}`*\s*", line):
            fence = None
        sections[-1][1].append(line)
    return [(step, "".join(lines)) for step, lines in sections if step is not None or "".join(lines).strip()]


def _keep_until(path: Path, start_step: int) -> None:
    """Drop what a crashed run logged past the checkpoint it resumes from, so no step appears twice."""
    if path.is_file():
        kept = [json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= start_step]
        write_atomic(path, "".join(kept))
    samples = path.with_name(SAMPLES_FILE)
    if samples.is_file():
        sections = sample_sections(samples.read_text(encoding="utf-8", errors="replace"))
        write_atomic(samples, "".join(s for step, s in sections if step is None or step <= start_step))


def format_samples(step: int, samples: dict[str, str]) -> str:
    """One samples.md section: a `## step N` heading, then each prompt and its sample in a fenced block."""
    parts = [f"## step {step}\n\n"]
    for prompt, sample in samples.items():
        parts.append(f"Prompt {markdown_code(json.dumps(prompt, ensure_ascii=False), block=False)}:\n\n")
        parts.append(markdown_code(sample, block=True) + "\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Formatting


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def si(value: float) -> str:
    """12345 → 12.3k: short enough for a progress bar."""
    if not math.isfinite(value):
        return str(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.{1 if suffix == 'k' else 2}f}{suffix}"
    return f"{value:.0f}"


def format_postfix(metrics: dict[str, float]) -> str:
    """`loss=2.345 lr=3.0e-04 gnorm=0.91 tok/s=12.3k mfu=4.1%` from whichever of these keys are present."""
    formats = {
        "loss": ("loss", lambda v: f"{v:.3f}"),
        "lr": ("lr", lambda v: f"{v:.1e}"),
        "grad_norm": ("gnorm", lambda v: f"{v:.2f}"),
        "tokens_per_sec": ("tok/s", si),
        "mfu": ("mfu", lambda v: f"{100 * v:.1f}%"),
    }
    return " ".join(f"{name}={fmt(metrics[k])}" for k, (name, fmt) in formats.items() if k in metrics)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# ---------------------------------------------------------------------------------------------
# The run log


class ProgressLines:
    """Progress for logs, when standard error is not a terminal: a plain line now and then (the first
    after a few seconds, so the expected time shows early) instead of a bar's frames filling the file."""

    def __init__(self, total: int, initial: int, first_after: float = 5.0, every: float = 30.0) -> None:
        self.total, self.initial, self.every = total, initial, every
        self.start = time.monotonic()
        self.next_at = self.start + first_after

    def update(self, step: int, postfix: str) -> None:
        now = time.monotonic()
        if now < self.next_at or step <= self.initial:
            return
        self.next_at = now + self.every
        elapsed = now - self.start
        rate = (step - self.initial) / elapsed
        eta = tqdm.format_interval((self.total - step) / rate)
        notice(
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%), {rate:.2f} steps/s, "
            f"elapsed {tqdm.format_interval(elapsed)}, ETA {eta}; {postfix}"
        )


class QuietLog:
    """The log of ranks other than 0 in multi-process training: rank 0 reports for all of them."""

    def train(self, step: int, metrics: dict[str, float]) -> None:
        return None

    def eval(self, step: int, metrics: dict[str, float], samples: dict[str, str] | None = None) -> None:
        return None

    def close(self, status: Status | None = None) -> None:
        return None


class RunLog:
    """Everything a training run reports, behind three calls: `train` every step, `eval`, `close`.

    Resuming (start_step > 0) continues the same files and tracker runs. Starting at 0 in a folder
    that has metrics.jsonl or samples.md empties them: they belong to a run that is being redone.
    Usable as a context manager, which closes with status "failed" if the block raises.
    """

    def __init__(
        self, run_dir: Path, config: RunConfig, run_name: str, start_step: int, max_steps: int
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.every = config.log.every
        self.max_steps = max_steps
        self.metrics_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        self.best_val_loss: float | None = None
        self.best_val_step: int | None = None
        self._closed = False
        self._changed = False  # anything logged since opening: loss.png is refreshed on close
        _keep_until(self.metrics_path, start_step)
        for record in read_metrics(self.metrics_path):
            self._track_best(record["step"], record.get("val_loss"))
        self._file = self.metrics_path.open("a", encoding="utf-8")
        self._bar: tqdm | None = None
        self._lines: ProgressLines | None = None
        self._trackers: list[TensorBoardTracker | MLflowTracker | WandbTracker] = []
        try:
            resume = start_step > 0
            if config.log.tensorboard:
                self._trackers.append(TensorBoardTracker(self.run_dir, start_step))
            if config.log.mlflow:
                self._trackers.append(MLflowTracker(self.run_dir, config, run_name, resume))
            if config.log.wandb:
                self._trackers.append(WandbTracker(self.run_dir, config, run_name, resume))
        except BaseException:
            self.close("failed")
            raise
        if os.environ.get(NO_PROGRESS_ENV, "") not in ("", "0"):
            return
        if not sys.stderr.isatty():
            self._lines = ProgressLines(max_steps, start_step)
            return
        self._bar = tqdm(
            total=max_steps,
            initial=start_step,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def train(self, step: int, metrics: dict[str, float]) -> None:
        """Call after every optimiser step; keys such as loss, lr, grad_norm, tokens_per_sec, mfu
        (a fraction: 0.041 shows as 4.1%) and tokens (seen so far)."""
        if self._bar is not None:
            self._bar.set_postfix_str(format_postfix(metrics), refresh=False)
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
        if self._lines is not None:
            self._lines.update(step, format_postfix(metrics))
        if step % self.every == 0 or step == self.max_steps:
            self._record(step, "train", metrics)

    def eval(self, step: int, metrics: dict[str, float], samples: dict[str, str] | None = None) -> None:
        """Call after each evaluation with e.g. val_loss, val_ppl, and samples as {prompt: text}."""
        if metrics:
            self._record(step, "val", metrics)
        if samples:
            with self.samples_path.open("a", encoding="utf-8") as f:
                f.write(format_samples(step, samples))
        loss = metrics.get("val_loss")
        if _finite(loss):
            best = self._track_best(step, loss)
            ppl = f", ppl {metrics['val_ppl']:.2f}" if _finite(metrics.get("val_ppl")) else ""
            tail = "new best" if best else f"best {self.best_val_loss:.4f} at step {self.best_val_step}"
            notice(f"step {step}/{self.max_steps}: val loss {loss:.4f}{ppl} ({tail})")
        plot_loss_curve(self.metrics_path, self.run_dir / LOSS_PNG)

    def close(self, status: Status | None = None) -> None:
        """Close the bar, the file and the trackers; safe to call twice.

        status None: "failed" if an exception is on its way (close called from a `finally`), else "finished".
        Pass "stopped" for a run that ends early on purpose, e.g. on Ctrl-C with an emergency checkpoint.
        """
        if self._closed:
            return
        self._closed = True
        if status is None:
            status = "failed" if sys.exc_info()[0] is not None else "finished"
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        for tracker in self._trackers:
            try:
                tracker.close(status)
            except Exception as e:  # the run's own files are safe: a tracker failing now must not crash it
                notice(f"could not close {type(tracker).__name__.strip('_')}: {e}")
        if self._changed:
            plot_loss_curve(self.metrics_path, self.run_dir / LOSS_PNG)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close("finished")
        else:
            self.close("stopped" if issubclass(exc_type, KeyboardInterrupt) else "failed")

    def _track_best(self, step: int, loss: Any) -> bool:
        if _finite(loss) and (self.best_val_loss is None or loss < self.best_val_loss):
            self.best_val_loss, self.best_val_step = float(loss), step
            return True
        return False

    def _record(self, step: int, split: str, metrics: dict[str, float]) -> None:
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        record = {"step": step, "split": split, **clean, "time": round(time.time(), 3)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._changed = True
        scalars = _scalars(metrics)
        for tracker in self._trackers:
            tracker.log(split, step, scalars)


# ---------------------------------------------------------------------------------------------
# The loss curve


def smooth(values: list[float], weight: float) -> list[float]:
    """EMA run forwards then backwards: smooths without the lag a one-way EMA shows as loss falls fast."""
    out = list(values)
    for order in (range(len(out)), range(len(out) - 1, -1, -1)):
        ema = None
        for i in order:
            ema = out[i] if ema is None else weight * ema + (1 - weight) * out[i]
            out[i] = ema
    return out


def plot_loss_curve(metrics_path: Path, out_png: Path) -> None:
    """Train loss (raw, and smoothed when there are many points) and val loss against step, as a PNG.

    No metrics yet: no plot, no error. The y axis is logarithmic when the losses span more than 10x.
    """
    records = read_metrics(Path(metrics_path))
    train = sorted(
        (r["step"], r["loss"]) for r in records if r.get("split") == "train" and _finite(r.get("loss"))
    )
    val = sorted(
        (r["step"], r["val_loss"]) for r in records if r.get("split") == "val" and _finite(r.get("val_loss"))
    )
    if not train and not val:
        return
    from matplotlib.figure import Figure  # no pyplot: no global state, no display, Agg renders the PNG
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if train:
        steps, losses = [s for s, _ in train], [v for _, v in train]
        window = min(len(losses) // 25, 100)  # points averaged over, about
        if window >= 3:
            ax.plot(steps, losses, color="C0", alpha=0.25, linewidth=0.8, label="train")
            smoothed = smooth(losses, 1 - 2 / (window + 1))
            ax.plot(steps, smoothed, color="C0", linewidth=1.8, label="train (smoothed)")
        else:
            ax.plot(steps, losses, color="C0", linewidth=1.5, label="train")
    if val:
        vsteps, vlosses = [s for s, _ in val], [v for _, v in val]
        ax.plot(vsteps, vlosses, "o-", color="C1", markersize=4, linewidth=1.5, label="val")
        best_step, best = min(val, key=lambda p: p[1])
        ax.plot(
            [best_step],
            [best],
            "*",
            color="C3",
            markersize=12,
            label=f"best val {best:.4f} (step {best_step})",
        )
    values = [v for _, v in train + val]
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_title(f"{Path(metrics_path).parent.name}: loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    write_atomic(Path(out_png), buffer.getvalue())
