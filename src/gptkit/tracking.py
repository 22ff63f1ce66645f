"""A run's records shared by training and evaluation: the optional trackers — TensorBoard, MLflow,
Weights & Biases — each a copy of metrics.jsonl, and the markdown quoting of samples.md and eval.md.

Each is imported only when switched on in the config's `log` section, with a one-line error
naming the extra to install when it is missing. A resumed run continues the same tracker run.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from gptkit.config import RunConfig
from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.files import write_atomic
from gptkit.layout import TENSORBOARD_FOLDER

MLFLOW_RUN_ID_FILE = "mlflow_run_id"
WANDB_RUN_ID_FILE = "wandb_run_id"

Status = Literal["finished", "stopped", "failed"]


def _tag(split: str, key: str) -> str:
    """TensorBoard/W&B name: train/loss, val/loss (not val/val_loss)."""
    return f"{split}/{key.removeprefix('val_') if split == 'val' else key}"


def _mlflow_key(split: str, key: str) -> str:
    """MLflow name: train_loss, val_loss."""
    return key if split == "val" and key.startswith("val_") else f"{split}_{key}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"n_layer": 4}} → {"model.n_layer": 4}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _missing(option: str, package: str) -> GptkitError:
    return GptkitError(
        f"log.{option} is on but {package} is not installed; "
        f"pip install 'gptkit[{option}]' or set log.{option}=false"
    )


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_installed(config: RunConfig) -> None:
    """The trackers switched on are installed: checked before the run folder is made (importing them
    here costs nothing extra: the tracker imports them next)."""
    import importlib

    for option, package in TRACKER_PACKAGES.items():
        if getattr(config.log, option):
            try:
                importlib.import_module(package)
            except ImportError:
                raise _missing(option, package) from None


class TensorBoardTracker:
    def __init__(self, run_dir: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        # Purging from start_step + 1 hides what a crashed run wrote past its checkpoint, as in metrics.jsonl.
        self.writer = SummaryWriter(
            str(run_dir / TENSORBOARD_FOLDER), purge_step=start_step + 1 if start_step else None
        )

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(_tag(split, key), value, step)
        if split == "val":
            self.writer.flush()

    def close(self, status: Status) -> None:
        self.writer.close()


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Hide libraries' INFO chatter (e.g. MLflow creating its tables) for a moment."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def mlflow_local_uri(run_dir: Path) -> str:
    """MLflow's store when log.mlflow_tracking_uri is unset: SQLite in the run folder (MLflow 3 refuses
    its old file store unless told otherwise, and SQLite needs no server)."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve().as_posix()}"


class MLflowTracker:
    EXPERIMENT = "gptkit"
    STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(self, run_dir: Path, config: RunConfig, run_name: str, resume: bool) -> None:
        try:
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self._metric = Metric
        uri = config.log.mlflow_tracking_uri or mlflow_local_uri(run_dir)
        id_file = run_dir / MLFLOW_RUN_ID_FILE
        try:
            with _quiet("mlflow.store.db.utils", "alembic"):
                self.client = MlflowClient(tracking_uri=uri)
            self.run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
            if self.run_id:
                try:
                    self.client.update_run(self.run_id, status="RUNNING")
                except MlflowException:
                    notice(f"MLflow run {self.run_id} is not in {uri}; starting a new MLflow run")
                    self.run_id = ""
            if not self.run_id:
                experiment = self.client.get_experiment_by_name(self.EXPERIMENT)
                if experiment is not None:
                    experiment_id = experiment.experiment_id
                else:
                    local = config.log.mlflow_tracking_uri is None
                    artifacts = (run_dir / "mlartifacts").resolve().as_uri() if local else None
                    experiment_id = self.client.create_experiment(
                        self.EXPERIMENT, artifact_location=artifacts
                    )
                run = self.client.create_run(experiment_id, run_name=run_name)
                self.run_id = run.info.run_id
                params = [Param(k, str(v)[:500]) for k, v in flatten(config.model_dump(mode="json")).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                    self.client.log_batch(self.run_id, params=params[i : i + 100])
                write_atomic(id_file, self.run_id + "\n")
        except MlflowException as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GptkitError(
                f"MLflow at {uri} failed: {first}; check log.mlflow_tracking_uri or set log.mlflow=false"
            ) from None

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [self._metric(_mlflow_key(split, k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact (e.g. a checkpoint's answers); the same name again replaces it."""
        self.client.log_text(self.run_id, text, artifact_file)

    def close(self, status: Status) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS[status])


class WandbTracker:
    def __init__(self, run_dir: Path, config: RunConfig, run_name: str, resume: bool) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        id_file = run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = wandb.init(
            mode="offline",
            dir=str(run_dir),
            project="gptkit",
            name=run_name,
            id=run_id,
            resume="allow" if run_id else None,
            config=config.model_dump(mode="json"),
        )
        write_atomic(id_file, self.run.id + "\n")

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        self.run.log({_tag(split, k): v for k, v in metrics.items()}, step=step)

    def close(self, status: Status) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


def markdown_code(text: str, block: bool) -> str:
    """Markdown code (inline or fenced) whose fence is longer than any backtick run inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    if block:
        fence = "`" * max(3, longest + 1)
        return f"{fence}text\n{text.rstrip(chr(10))}\n{fence}\n"
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"
