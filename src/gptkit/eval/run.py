"""Evaluate checkpoints on tasks: metrics, the run's results file, its benchmark curve, trackers.

Results of a run go to `RUN/eval.json`, one record per (checkpoint, task, limit, file, quantize):

    {"checkpoint": "step_00001000.pt", "step": 1000, "task": "hellaswag", "limit": null,
     "file": "/abs/hellaswag_val.jsonl", "quantize": null,
     "metrics": {"acc": 0.29, "acc_norm": 0.31, "n": 10042, "skipped": 0}, "time": 1.7e9}

so evaluating every checkpoint again skips what is already there, and `RUN/eval.png` plots each
task's metrics against the step. Metric definitions (lm-evaluation-harness v0.4):

  acc        share of examples whose right continuation has the highest summed log-likelihood
             (choice tasks), or whose target word is what greedy decoding gives (lambada)
  acc_norm   the same with each log-likelihood divided by its continuation's length in characters
             (the choice text without the leading space), as the harness's acc_norm
  ppl        lambada: exp(-mean over examples of log P(target word)): per word, not per token
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gptkit.checkpoint import is_run, newest_intact, run_of, step_files
from gptkit.config import EVAL_BATCH_SIZE, EVAL_DATA_DIR, EVAL_MAX_NEW_TOKENS, EvalConfig
from gptkit.console import notice
from gptkit.device import pick_device
from gptkit.errors import GptkitError
from gptkit.eval.answers import (
    ANSWERS,
    answer_questions,
    answers_text,
    read_questions,
    write_answers_file,
)
from gptkit.eval.perplexity import perplexity, read_tokens
from gptkit.eval.scoring import logits_fn, score_requests
from gptkit.eval.tasks import (
    PERPLEXITY,
    TASKS,
    TaskData,
    find_task_file,
    load_task,
    parse_tasks,
)
from gptkit.files import write_atomic
from gptkit.generate.inference import check_quantize, prepare
from gptkit.generate.textmodel import TextModel
from gptkit.layout import CHECKPOINT_FOLDER, EVAL_FILE, EVAL_MD, EVAL_PNG
from gptkit.loading import is_hf_folder, load_any
from gptkit.locks import hold
from gptkit.tokenizer import Tokenizer
from gptkit.tracking import MLflowTracker, TensorBoardTracker

KEY_FIELDS = ("checkpoint", "step", "task", "limit", "file", "quantize")  # what makes a result the same one
PLOTTED = {
    PERPLEXITY: ("bits_per_byte",),
    "hellaswag": ("acc", "acc_norm"),
    "lambada": ("acc",),
    "piqa": ("acc", "acc_norm"),
}


@dataclass
class EvalSettings:
    """What to evaluate and how; `files` name task files directly, `text` is perplexity's data
    (a prepared data folder or a text file; None: the data the model was trained on)."""

    tasks: list[str]
    limit: int | None = None
    batch_size: int = EVAL_BATCH_SIZE
    data_dir: str | Path = EVAL_DATA_DIR
    files: dict[str, str | Path] = field(default_factory=dict)
    text: str | Path | None = None
    window: int | None = None
    stride: int | None = None
    progress: bool = True
    prompts: str | Path | None = None  # a file of test questions, one a line, answered per checkpoint
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS  # the longest answer

    def __post_init__(self) -> None:
        self.tasks = parse_tasks(self.tasks) if self.tasks or self.prompts is None else []
        if self.max_new_tokens < 1:
            raise GptkitError(f"max new tokens must be at least 1, not {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise GptkitError(f"limit must be at least 1, not {self.limit}")
        if self.batch_size < 1:
            raise GptkitError(f"batch size must be at least 1, not {self.batch_size}")
        for name, value in (("window", self.window), ("stride", self.stride)):
            if value is not None and value < 1:
                raise GptkitError(f"{name} must be at least 1 token, not {value}")
        for task in self.files:
            if task not in TASKS:
                raise GptkitError(
                    f"task file given for {task!r}, which reads no file; tasks: {', '.join(TASKS)}"
                )


class Evaluator:
    """Runs tasks on models; task files are read once, however many checkpoints are evaluated."""

    def __init__(self, settings: EvalSettings) -> None:
        self.settings = settings
        self._data: dict[str, TaskData] = {}
        self._tokens: dict[tuple[str, str], np.ndarray] = {}
        self.questions = read_questions(settings.prompts) if settings.prompts is not None else None

    def task_data(self, task: str) -> TaskData:
        if task not in self._data:
            s = self.settings
            path = find_task_file(task, s.data_dir, s.files.get(task))
            data = load_task(task, path, s.limit)
            if data.skipped:
                notice(f"{path}: skipped {data.skipped} malformed line(s) (first: {data.problem})")
            self._data[task] = data
        return self._data[task]

    def source(self, task: str, default_text: str | Path | None) -> str:
        """The file or folder a task reads, as recorded in the results."""
        if task == PERPLEXITY:
            text = self.settings.text if self.settings.text is not None else default_text
            if text is None:
                raise GptkitError(
                    "perplexity needs text, and this model (e.g. a HuggingFace folder) names no data it "
                    "was trained on: pass --text with a prepared data folder or a text file, or choose "
                    "--tasks hellaswag, lambada or piqa"
                )
            return str(Path(text).resolve())
        return str(self.task_data(task).path.resolve())

    def run(
        self,
        task: str,
        forward: Callable[[Tensor], Tensor],
        tokenizer: Tokenizer,
        block_size: int,
        device: torch.device | str,
        default_text: str | Path | None = None,
    ) -> dict[str, Any]:
        s = self.settings
        if task == PERPLEXITY:
            source = self.source(task, default_text)
            window = min(s.window or block_size, block_size)
            stride = s.stride or window
            key = (source, tokenizer.fingerprint())
            if key not in self._tokens:
                need = None if s.limit is None else (s.limit - 1) * stride + window + 1
                self._tokens[key] = read_tokens(source, tokenizer, need)
            return perplexity(
                forward,
                self._tokens[key],
                tokenizer,
                window=window,
                stride=stride,
                device=device,
                batch_size=s.batch_size,
                limit=s.limit,
                progress=s.progress,
            )
        data = self.task_data(task)
        requests = [(ex.context, c) for ex in data.examples for c in ex.continuations]
        scores = score_requests(
            forward,
            tokenizer,
            requests,
            block_size,
            device=device,
            batch_size=s.batch_size,
            progress=s.progress,
            desc=task,
        )
        metrics: dict[str, Any]
        if TASKS[task].kind == "cloze":
            metrics = {
                "acc": sum(sc.greedy for sc in scores) / len(scores),
                "ppl": math.exp(-sum(sc.logprob for sc in scores) / len(scores)),
            }
        else:
            acc = acc_norm = 0
            i = 0
            for ex in data.examples:
                lls = np.array([sc.logprob for sc in scores[i : i + len(ex.continuations)]])
                i += len(ex.continuations)
                lengths = np.array([len(c) - 1 for c in ex.continuations], dtype=np.float64)  # without " "
                acc += int(np.argmax(lls)) == ex.label
                acc_norm += int(np.argmax(lls / lengths)) == ex.label
            metrics = {"acc": acc / len(data.examples), "acc_norm": acc_norm / len(data.examples)}
        return {**metrics, "n": len(data.examples), "skipped": data.skipped}

    def run_all(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        block_size: int,
        device: torch.device | str,
        default_text: str | Path | None = None,
        tasks: list[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        forward = logits_fn(model)
        return {
            task: self.run(task, forward, tokenizer, block_size, device, default_text)
            for task in (tasks or self.settings.tasks)
        }


# -- results file and plot ---------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of an eval.json; a missing file is an empty list, a damaged one an error."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data["results"]
        if not isinstance(records, list):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise GptkitError(f"{path} is not a gptkit results file; move it away and evaluate again") from None
    return [r for r in records if isinstance(r, dict)]


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(k) for k in KEY_FIELDS)


def save_results(path: Path, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add records (replacing those with the same key); atomic, so a crash keeps the old file."""
    keys = {_key(r) for r in new}
    records = [r for r in read_results(path) if _key(r) not in keys] + new
    records.sort(key=lambda r: (r.get("step") or 0, str(r.get("task"))))
    write_atomic(
        path, json.dumps({"format": "gptkit-eval", "results": records}, indent=1, allow_nan=False) + "\n"
    )
    return records


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def plot_results(records: list[dict[str, Any]], out_png: Path, title: str) -> bool:
    """Each task's metrics against the checkpoint step. A curve only joins comparable points: those
    with the limit, file and quantisation of the task's newest record."""
    setup = {r.get("task"): _key(r)[3:] for r in sorted(records, key=lambda r: r.get("time") or 0)}
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        task, step, metrics = r.get("task"), r.get("step"), r.get("metrics") or {}
        if task not in PLOTTED or not isinstance(step, int) or _key(r)[3:] != setup[task]:
            continue
        for name in PLOTTED[task]:
            value = metrics.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                curves.setdefault(task, {}).setdefault(name, {})[step] = float(value)
    if not curves:
        return False
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    fig = Figure(figsize=(4.2 * len(curves), 3.8), layout="constrained")
    for i, (task, metrics) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), i + 1)
        for name, points in metrics.items():
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], "o-", markersize=4, label=name)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte" if task == PERPLEXITY else "accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}: benchmarks")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_atomic(out_png, buffer.getvalue())
    return True


def format_table(step: int | None, checkpoint: str, results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: task, metric, value, examples."""
    rows = [("task", "metric", "value", "n")]
    for task, metrics in results.items():
        n = metrics.get("tokens", metrics.get("n", ""))
        for name, value in metrics.items():
            if name in ("n", "skipped", "tokens", "bytes", "window", "stride"):
                continue
            shown = (
                (f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}")
                if isinstance(value, float)
                else str(value)
            )
            rows.append((task, name, shown, f"{n} tokens" if "tokens" in metrics else str(n)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [checkpoint if step is None else f"{checkpoint} (step {step})"]  # a HF folder has no step
    for j, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- checkpoints -------------------------------------------------------------------------------


def _run_folder(checkpoint: Path) -> Path:
    """Where results go: a checkpoint's run folder (RUN/checkpoints/x.pt → RUN), else the checkpoint's
    folder; a HuggingFace folder keeps its own."""
    if checkpoint.is_dir():
        return checkpoint
    return run_of(checkpoint) or checkpoint.resolve().parent


def _load(
    path: Path, device: torch.device, quantize: str | None
) -> tuple[nn.Module, Tokenizer, Any, int | None, dict[str, Any] | None]:
    """The model prepared for inference, its tokenizer, config, step and chat template."""
    model, tokenizer, config, _, payload = load_any(path)  # payload {} for a HuggingFace folder
    model = prepare(model, device, quantize)
    step = (payload.get("progress") or {}).get("step")
    return model, tokenizer, config, step if isinstance(step, int) else None, payload.get("chat_template")


def evaluate_checkpoints(
    target: str | Path,
    settings: EvalSettings,
    *,
    all_checkpoints: bool = False,
    device: str = "auto",
    quantize: str | None = None,
    tensorboard: bool = False,
    mlflow: bool = False,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate a checkpoint, a run's newest one, or (`all_checkpoints`) every checkpoint of a run,
    skipping the (checkpoint, task) pairs its eval.json already holds; with `settings.prompts`, each
    checkpoint also answers the questions (kept in eval.json and RUN/eval.md). Returns one dict per
    checkpoint evaluated: checkpoint, step, results {task: metrics}, answers (or None).
    `on_result(checkpoint, that)` is called as each is done (the CLI prints its table), before its
    results are saved.

    The eval.json of the run is locked for the whole evaluation: a second `gptkit eval` of the same
    run is refused at once, naming this process, rather than after its work."""
    with ExitStack() as stack:
        return _evaluate_checkpoints(
            target,
            settings,
            _ResultLocks(stack),
            all_checkpoints,
            device,
            quantize,
            tensorboard,
            mlflow,
            on_result,
        )


@dataclass
class _ResultLocks:
    """The results files an evaluation holds the lock of, each taken once (a process cannot take
    its own lock twice). An unwritable folder is no reason to stop before evaluating: the results
    are printed, and saving them fails with a clear message."""

    stack: ExitStack
    held: set[Path] = field(default_factory=set)

    def take(self, results: Path) -> None:
        if results in self.held:
            return
        try:
            self.stack.enter_context(hold(results, f"{str(results)!r}"))
        except OSError:
            return
        self.held.add(results)


def _evaluate_checkpoints(
    target: str | Path,
    settings: EvalSettings,
    locks: _ResultLocks,
    all_checkpoints: bool,
    device: str,
    quantize: str | None,
    tensorboard: bool,
    mlflow: bool,
    on_result: Callable[[str, dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    check_quantize(quantize)
    target = Path(target)
    if all_checkpoints:
        if not is_run(target):
            raise GptkitError(
                f"--all-checkpoints needs a run folder (with {CHECKPOINT_FOLDER}/), not {str(target)!r}"
            )
        paths = [p for _, p in step_files(target)]
        if not paths:
            raise GptkitError(f"run {str(target)!r} has no checkpoint yet; train it first")
    else:
        paths = [target if is_hf_folder(target) else newest_intact(target)[0]]
    dev = pick_device(device)
    evaluator = Evaluator(settings)
    out: list[dict[str, Any]] = []
    for path in paths:
        run_dir = _run_folder(path)
        results_path = run_dir / EVAL_FILE
        locks.take(results_path)
        done = {_key(r) for r in read_results(results_path)}
        model, tokenizer, config, step, chat_template = _load(path, dev, quantize)
        # a HF folder's config is gptkit's defaults: its data.path names nothing it was trained on
        default_text = config.data.path if config.data.path and not is_hf_folder(path) else None

        def key(
            task: str, path: Path = path, step: int | None = step, default_text: Any = default_text
        ) -> tuple:
            return (path.name, step, task, settings.limit, evaluator.source(task, default_text), quantize)

        todo = [t for t in settings.tasks if not (all_checkpoints and key(t) in done)]
        answers_key = None  # answers are kept per checkpoint and questions file
        if settings.prompts is not None:
            answers_key = (path.name, step, ANSWERS, None, str(Path(settings.prompts).resolve()), quantize)
        answer = answers_key is not None and not (all_checkpoints and answers_key in done)
        if not todo and not answer:
            asked = [*settings.tasks, *([ANSWERS] if answers_key is not None else [])]
            notice(f"{path.name} (step {step}): already evaluated on {', '.join(asked)}; skipped")
            continue
        results = (
            evaluator.run_all(model, tokenizer, model.tokens_that_fit(), dev, default_text, todo)
            if todo
            else {}
        )
        now = time.time()
        records = [
            dict(
                zip(KEY_FIELDS, key(task), strict=True),
                metrics=_json_safe(m),
                time=now,
            )
            for task, m in results.items()
        ]
        answered = None
        if answer:
            assert evaluator.questions is not None and answers_key is not None
            text_model = TextModel(model, tokenizer, source=str(path), chat_template=chat_template)
            qa = answer_questions(text_model, evaluator.questions, settings.max_new_tokens)
            answered = dict(
                zip(KEY_FIELDS, answers_key, strict=True), metrics={"n": len(qa)}, answers=qa, time=now
            )
            records.append(answered)
        done_one = {
            "checkpoint": str(path),
            "step": step,
            "results": results,
            "answers": answered["answers"] if answered else None,
        }
        out.append(done_one)
        if on_result is not None:  # shown first: a folder that cannot be written loses nothing on screen
            on_result(str(path), done_one)
        try:
            all_records = save_results(results_path, records)
            if len({r.get("step") for r in all_records}) > 1 or all_checkpoints:
                plot_results(all_records, run_dir / EVAL_PNG, run_dir.name)
            if answered is not None:
                write_answers_file(all_records, run_dir / EVAL_MD, run_dir.name)
        except OSError as e:
            raise GptkitError(
                f"cannot save the results to {str(results_path)!r}: {e.strerror or e}; the results "
                "above were not saved (make the folder writable and evaluate again)"
            ) from None
        flat = flat_metrics(results)
        if (tensorboard or mlflow) and step is not None and (flat or answered is not None):
            _track(run_dir, config, step, flat, tensorboard, mlflow, answered)
        del model
    return out


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"hellaswag": {"acc": .3}} → {"hellaswag_acc": .3}: the scalars trackers and metrics.jsonl take."""
    skip = ("n", "skipped", "tokens", "bytes", "window", "stride")
    return {
        f"{task}_{name}": float(v)
        for task, metrics in results.items()
        for name, v in metrics.items()
        if name not in skip and isinstance(v, (int, float)) and math.isfinite(v)
    }


def _track(
    run_dir: Path,
    config: Any,
    step: int,
    metrics: dict[str, float],
    tensorboard: bool,
    mlflow: bool,
    answered: dict[str, Any] | None = None,
) -> None:
    """The trainer's TensorBoard/MLflow writers, under the split "eval", at the checkpoint's step;
    answers go to MLflow as text, one file per checkpoint (answers/step_N.md)."""
    trackers: list[TensorBoardTracker | MLflowTracker] = []
    try:
        if tensorboard:
            trackers.append(TensorBoardTracker(run_dir, 0))
        if mlflow:
            trackers.append(MLflowTracker(run_dir, config, run_dir.name, resume=True))
        for tracker in trackers:
            if metrics:
                tracker.log("eval", step, metrics)
            if answered is not None and isinstance(tracker, MLflowTracker):
                tracker.log_text(answers_text(answered), f"{ANSWERS}/step_{step:08d}.md")
    finally:
        for tracker in trackers:
            tracker.close("finished")


# -- inside training ---------------------------------------------------------------------------


class TrainingTasks:
    """The configured tasks (`eval.tasks`) run at each evaluation of a training run: the trainer's
    task evaluator, made by the training command and owned by its trainer, so task files are read
    once per run."""

    def __init__(self, ec: EvalConfig, default_text: str | Path | None) -> None:
        self.tasks = list(ec.tasks)
        self.default_text = default_text
        settings = EvalSettings(
            tasks=self.tasks,
            limit=ec.task_limit,
            batch_size=ec.task_batch_size,
            data_dir=ec.task_data,
            progress=False,
        )
        self.evaluator = Evaluator(settings)

    def check(self) -> None:
        """Read the tasks' files now, before training's first step, so that a missing or malformed
        one is an error then rather than at the first evaluation."""
        for task in self.tasks:
            self.evaluator.source(task, self.default_text)

    def metrics(
        self, model: nn.Module, tokenizer: Tokenizer, block_size: int, device: torch.device
    ) -> dict[str, float]:
        """Flat metrics for `RunLog.eval`."""
        return flat_metrics(self.evaluator.run_all(model, tokenizer, block_size, device, self.default_text))
