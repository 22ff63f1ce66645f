"""`gptkit train`/`finetune` as a command: options and overrides in any order, --device,
--no-progress, progress lines in logs, warnings and checks before anything is written."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptkit.api import prepare
from gptkit.training.runlog import ProgressLines

SMALL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.micro_batch_size=4",
    "train.precision=fp32",
    "eval.batches=1",
    "eval.sample_tokens=0",
    "checkpoint.every_steps=0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_train")
    text = root / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 3000)
    prepare([str(text)], root / "data", tokenizer="char", progress=False, workers=1, val_fraction=0.2)
    return root / "data"


def gptkit(
    *args: str, cwd: Path, env: dict[str, str] | None = None, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    start = ["-m", "gptkit"] if code is None else ["-c", code]
    return subprocess.run(
        [sys.executable, *start, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def two_runs(
    data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[subprocess.CompletedProcess[str]]]:
    """A run stopped at step 1 and resumed to step 2, options and overrides mixed; the config keeps the
    default warm-up (100 steps), longer than the run."""
    folder = tmp_path_factory.mktemp("two_runs")
    (folder / "c.yaml").write_text("train:\n  max_steps: 2\n")
    base = [*SMALL, f"data.path={data}"]
    first = gptkit("train", "c.yaml", "--device", "cpu", "--stop-at", "1", "name=q", *base, cwd=folder)
    assert first.returncode == 0, first.stderr[-2000:]
    again = gptkit(
        "train",
        "c.yaml",
        "--resume",
        "latest",
        "name=q",
        "--device",
        "cpu",
        *base,
        "--no-progress",
        cwd=folder,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    return folder, [first, again]


def test_options_and_overrides_mix_in_any_order_and_device_is_a_flag(
    two_runs: tuple[Path, list[subprocess.CompletedProcess[str]]],
) -> None:
    folder, (_, again) = two_runs
    assert "resuming from" in again.stderr and "(step 2," in again.stdout
    assert "device: cpu" in (folder / "runs" / "q" / "config.yaml").read_text()
    unknown = gptkit("train", "c.yaml", "--nope", "name=q", cwd=folder)
    assert unknown.returncode == 2 and "unrecognized arguments: --nope" in unknown.stderr
    help_text = gptkit("finetune", "--help", cwd=folder).stdout
    assert "configs/sft.yaml" in help_text and "configs/tiny.yaml" not in help_text
    assert "--device" in help_text and "--no-progress" in help_text
    for command in ("sample", "chat", "eval"):
        assert "HuggingFace GPT-2 folder" in gptkit(command, "--help", cwd=folder).stdout, command


def test_progress_in_a_log_is_plain_lines_with_the_eta_not_bar_frames(
    two_runs: tuple[Path, list[subprocess.CompletedProcess[str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Standard error is a pipe here, as in a log file: no bar frames; plain lines carry the ETA."""
    _, (first, again) = two_runs
    assert "\r" not in first.stderr and "step/s" not in first.stderr
    assert "\r" not in again.stderr
    lines = ProgressLines(total=400, initial=0, first_after=0.0, every=3600.0)
    time.sleep(0.05)
    lines.update(10, "loss=2.000")
    lines.update(11, "loss=1.900")  # within `every`: nothing
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.fullmatch(
        r"gptkit: step 10/400 \(2%\), [\d.]+ steps/s, elapsed 00:00, ETA \d\d:\d\d; loss=2.000", err[0]
    )


def test_warmup_longer_than_the_run_is_warned_once_before_step_1(
    two_runs: tuple[Path, list[subprocess.CompletedProcess[str]]],
) -> None:
    _, (first, _) = two_runs
    warning = "train.warmup_steps (100) exceeds train.max_steps (2)"
    assert first.stderr.count(warning) == 1
    assert first.stderr.index(warning) < first.stderr.index("parameters on")  # before the run starts


def test_a_missing_tracker_package_stops_before_anything_is_written(tmp_path: Path, data: Path) -> None:
    """wandb is made unimportable in this process, as it is where the extra is not installed."""
    code = "import sys; sys.modules['wandb'] = None; from gptkit.cli import main; sys.exit(main())"
    (tmp_path / "c.yaml").write_text("{}\n")
    args = ["train", "c.yaml", *SMALL, f"data.path={data}", "train.max_steps=2", "log.wandb=true", "name=w"]
    out = gptkit(*args, cwd=tmp_path, code=code)
    assert out.returncode == 2
    assert "pip install 'gptkit[wandb]'" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
