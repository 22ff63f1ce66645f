"""A run's checkpoints: one file per saved step, the last K kept plus the best by val loss.

`runs/NAME/checkpoints/step_00001000.pt` ... and `best.json` naming the best one. Each file is
written atomically (gptkit.checkpoint), so a crash leaves every earlier file intact; resuming
takes the newest file that loads, and says so when it has to skip a damaged one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gptkit.checkpoint import load_newest, save_checkpoint
from gptkit.errors import GptkitError
from gptkit.files import write_atomic

NAME = re.compile(r"^step_(\d+)\.pt$")
RUN_RECORDS = ("metrics.jsonl", "samples.md", "eval.json", "report.md")  # runlog, report, eval.run


def step_files(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of a run's checkpoint files, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def load_latest(run_dir: Path, map_location: str = "cpu") -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of the run that loads; damaged newer ones are named and skipped."""
    files = step_files(run_dir)
    if not files:
        if earlier_run_files(run_dir):
            raise GptkitError(
                f"run {str(run_dir)!r} has no checkpoint to resume from (an earlier run stopped before "
                "saving one); move the folder away or choose another run name (name=...)"
            )
        raise GptkitError(f"run {str(run_dir)!r} has no checkpoint to resume from; start it without --resume")
    found = load_newest([p for _, p in files], map_location)
    if found is None:
        names = ", ".join(p.name for _, p in files)
        raise GptkitError(
            f"no checkpoint of run {str(run_dir)!r} is intact ({names}: damaged, see above); to start the "
            "run again, move the folder away or choose another run name (name=...)"
        )
    return found


def earlier_run_files(run_dir: Path) -> list[str]:
    """What a run that logged or was evaluated left in its folder: a fresh run there would mix with it."""
    return [name for name in RUN_RECORDS if (run_dir / name).is_file()]


class RunCheckpoints:
    """Saves step checkpoints and rotates them, never deleting the best one."""

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.folder = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.best_file = self.folder / "best.json"

    def best(self) -> dict[str, Any] | None:
        """{"step", "val_loss", "file"} of the best checkpoint so far, or None."""
        if not self.best_file.is_file():
            return None
        return json.loads(self.best_file.read_text())

    def save(self, step: int, *, val_loss: float | None = None, **payload: Any) -> Path:
        """Write the step's checkpoint; mark it best if `val_loss` beats the best; rotate."""
        path = save_checkpoint(self.folder / f"step_{step:08d}.pt", **payload)
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
        files = step_files(self.folder.parent)
        for _, path in files[: max(0, len(files) - self.keep_last)]:
            if path.name != keep_best:
                path.unlink(missing_ok=True)
