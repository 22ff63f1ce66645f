"""A run folder's checkpoints, the one place that handles them: listing, rotation, best, newest intact.

`runs/NAME/checkpoints/step_00001000.pt` ... and `best.json` naming the best one, beside the run's
records (`gptkit.layout` names every file of a run folder). Each file is written atomically
(checkpoint/format.py), so a crash leaves every earlier file intact; resuming, sampling or evaluating
a run takes the newest file that loads, and says so when it has to skip a damaged one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from gptkit.checkpoint.format import load_checkpoint, save_checkpoint
from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.files import remove_orphans, write_atomic
from gptkit.layout import CHECKPOINT_FOLDER, RUN_RECORDS

NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FOLDER


def is_run(path: str | Path) -> bool:
    return checkpoint_folder(path).is_dir()


def run_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint file sits in (RUN/checkpoints/x.pt → RUN, resolved), else None."""
    parent = Path(checkpoint).resolve().parent
    return parent.parent if parent.name == CHECKPOINT_FOLDER else None


def step_file(run_dir: str | Path, step: int) -> Path:
    return checkpoint_folder(run_dir) / f"step_{step:08d}.pt"


def step_files(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of a run's checkpoint files, oldest step first: the one listing of a run."""
    folder = checkpoint_folder(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def earlier_run_files(run_dir: Path) -> list[str]:
    """What a run that logged or was evaluated left in its folder: a fresh run there would mix with it."""
    return [name for name in RUN_RECORDS if (run_dir / name).is_file()]


def remove_orphan_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporaries killed processes left in the run folder and its checkpoints."""
    return remove_orphans(run_dir) + remove_orphans(checkpoint_folder(run_dir))


def newest_intact(
    path: str | Path, map_location: str | torch.device = "cpu", *, resuming: bool = False
) -> tuple[Path, dict[str, Any]]:
    """A checkpoint file, or a run folder's newest checkpoint that loads: (its path, its payload).
    Damaged newer ones are named and skipped (they stay for inspection). `resuming`: the folder is
    the run `gptkit train --resume` continues, and the errors say how to start it again."""
    path = Path(path)
    if not resuming:
        if not path.is_dir():
            return path, load_checkpoint(path, map_location)
        if not is_run(path):
            raise GptkitError(
                f"{str(path)!r} is not a run folder (no {CHECKPOINT_FOLDER}/ inside); pass a run folder "
                "such as runs/tiny or a checkpoint file"
            )
    files = step_files(path)
    if not files:
        if not resuming:
            raise GptkitError(f"run {str(path)!r} has no intact checkpoint yet; train it first")
        if earlier_run_files(path):
            raise GptkitError(
                f"run {str(path)!r} has no checkpoint to resume from (an earlier run stopped before "
                "saving one); move the folder away or choose another run name (name=...)"
            )
        raise GptkitError(f"run {str(path)!r} has no checkpoint to resume from; start it without --resume")
    for _, file in reversed(files):
        try:
            return file, load_checkpoint(file, map_location)
        except GptkitError as e:
            notice(f"{e}; falling back to an earlier checkpoint")
    fix = (
        "to start the run again, move the folder away or choose another run name (name=...)"
        if resuming
        else "pass a checkpoint file from elsewhere, or train the run again"
    )
    names = ", ".join(p.name for _, p in files)
    raise GptkitError(f"no checkpoint of run {str(path)!r} is intact ({names}: damaged, see above); {fix}")


class RunCheckpoints:
    """Saves step checkpoints and rotates them, never deleting the best one."""

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.run_dir = run_dir
        self.folder = checkpoint_folder(run_dir)
        self.keep_last = keep_last
        self.best_file = self.folder / "best.json"

    def best(self) -> dict[str, Any] | None:
        """{"step", "val_loss", "file"} of the best checkpoint so far, or None."""
        if not self.best_file.is_file():
            return None
        return json.loads(self.best_file.read_text())

    def save(self, step: int, *, val_loss: float | None = None, **payload: Any) -> Path:
        """Write the step's checkpoint; mark it best if `val_loss` beats the best; rotate."""
        path = save_checkpoint(step_file(self.run_dir, step), **payload)
        best = self.best()
        if val_loss is not None and (best is None or val_loss < best["val_loss"]):
            self._write_best({"step": step, "val_loss": val_loss, "file": path.name})
        self._rotate()
        return path

    def _write_best(self, best: dict[str, Any]) -> None:
        write_atomic(self.best_file, json.dumps(best), durable=True)

    def _rotate(self) -> None:
        best = self.best()
        keep_best = best["file"] if best else None
        files = step_files(self.run_dir)
        for _, path in files[: max(0, len(files) - self.keep_last)]:
            if path.name != keep_best:
                path.unlink(missing_ok=True)
