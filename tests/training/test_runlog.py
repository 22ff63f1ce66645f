"""The run log and report, with the real libraries: files, TensorBoard events, an MLflow store, the PNG."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from gptkit.config import RunConfig
from gptkit.errors import GptkitError
from gptkit.tracking import mlflow_local_uri
from gptkit.training.report import write_report
from gptkit.training.runlog import (
    RunLog,
    format_postfix,
    plot_loss_curve,
    read_metrics,
    sample_sections,
)

PROMPTS = ["\n", "ROMEO:"]


@pytest.fixture(autouse=True)
def _no_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTKIT_NO_PROGRESS", "1")


def make_config(**log: object) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"preset": "tiny", "vocab_size": 65},
            "train": {"max_steps": 30},
            "log": {"every": 5, **log},
        }
    )


def loss_at(step: int, offset: float = 0.0) -> float:
    return 1.0 + 3.0 * 0.9**step + offset


def drive(log: RunLog, first: int, last: int, offset: float = 0.0) -> None:
    """Fake steps first..last with a falling loss; an eval (with samples) every 10 steps."""
    for step in range(first, last + 1):
        metrics = {
            "loss": loss_at(step, offset),
            "lr": 3e-4,
            "grad_norm": 0.5,
            "tokens_per_sec": 12_345.0,
            "mfu": 0.041,
            "tokens": step * 1024,
        }
        log.train(step, metrics)
        if step % 10 == 0:
            val = loss_at(step, offset) + 0.1
            samples = {p: f"sample of step {step} after {p!r}" for p in PROMPTS}
            log.eval(step, {"val_loss": val, "val_ppl": math.exp(val)}, samples)


def by_split(run_dir: Path, split: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == split]


def test_metrics_samples_plot_and_report(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    log = RunLog(run, make_config(), "demo", start_step=0, max_steps=30)
    drive(log, 1, 30)
    log.close()
    log.close()  # twice is fine

    train = by_split(run, "train")
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[0]["loss"] == pytest.approx(loss_at(5))
    assert set(train[0]) == {
        "step",
        "split",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "mfu",
        "tokens",
        "time",
    }
    assert train[-1]["tokens"] == 30 * 1024
    val = by_split(run, "val")
    assert [r["step"] for r in val] == [10, 20, 30]
    assert val[-1]["val_loss"] == pytest.approx(loss_at(30) + 0.1)

    samples = (run / "samples.md").read_text()
    assert [s for s, _ in sample_sections(samples)] == [10, 20, 30]
    assert "## step 20\n" in samples and 'Prompt `"ROMEO:"`' in samples and 'Prompt `"\\n"`' in samples
    assert "```text\nsample of step 20 after 'ROMEO:'\n```" in samples

    png = (run / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    report = write_report(
        run,
        {
            "run_name": "demo",
            "status": "finished",
            "config": make_config().model_dump(mode="json"),
            "params": 812_160,
            "tokenizer": "char",
            "device": "cpu",
            "precision": "fp32",
            "steps": 30,
            "tokens": 30 * 1024,
            "wall_seconds": 125.0,
            "tokens_per_sec": 12_345.0,
        },
    ).read_text()
    assert report.startswith("# demo\n") and "**Status:** finished" in report
    assert "30 of 30" in report and "30,720 (30.7k)" in report and "2m 05s" in report
    assert "12.3k tokens/s" in report and "4.1%" in report and "0.81M parameters" in report
    assert f"{loss_at(30) + 0.1:.4f}" in report and "at step 30" in report  # best val, from metrics.jsonl
    assert f"{loss_at(30):.4f}" in report  # final train loss
    assert "4 layers, 4 heads, 128 wide, context 128" in report and "fp32 on cpu" in report
    assert "![loss curve](loss.png)" in report
    assert "## Samples at step 30" in report and "sample of step 30 after 'ROMEO:'" in report
    assert "Resume with" not in report


def test_stopped_report_and_missing_pieces(tmp_path: Path) -> None:
    report = write_report(
        tmp_path,
        {
            "status": "stopped early (emergency checkpoint)",
            "resume_command": "gptkit train x --resume latest",
            "config": {"model": {"n_layer": 2, "n_head": 2, "n_embd": 64}},  # partial: defaults fill in
        },
    ).read_text()
    assert f"# {tmp_path.name}\n" in report
    assert "```sh\ngptkit train x --resume latest\n```" in report
    assert "| best val loss | — |" in report and "loss.png" not in report
    assert "2 layers, 2 heads, 64 wide" in report and "cosine, 100 warm-up steps" in report


def test_last_step_is_logged_and_nan_is_null(tmp_path: Path) -> None:
    log = RunLog(tmp_path, make_config(), "odd", start_step=0, max_steps=7)
    for step in range(1, 8):
        log.train(step, {"loss": math.nan if step == 5 else 2.0})
    log.close()
    train = by_split(tmp_path, "train")
    assert [(r["step"], r["loss"]) for r in train] == [(5, None), (7, 2.0)]


def test_resume_drops_steps_past_the_checkpoint(tmp_path: Path) -> None:
    log = RunLog(tmp_path, make_config(), "r", start_step=0, max_steps=30)
    drive(log, 1, 30)
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 31, "split": "tr')  # a crash mid-line

    log = RunLog(tmp_path, make_config(), "r", start_step=15, max_steps=30)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 10, 10, 15]
    assert [s for s, _ in sample_sections((tmp_path / "samples.md").read_text())] == [10]
    assert log.best_val_step == 10
    drive(log, 16, 30, offset=1.0)
    log.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line whole again
    train = by_split(tmp_path, "train")
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["loss"] == pytest.approx(loss_at(30, 1.0))
    assert [r["step"] for r in by_split(tmp_path, "val")] == [10, 20, 30]
    assert [s for s, _ in sample_sections((tmp_path / "samples.md").read_text())] == [10, 20, 30]


def test_samples_with_fences_and_headings_inside(tmp_path: Path) -> None:
    log = RunLog(tmp_path, make_config(), "s", start_step=0, max_steps=30)
    tricky = "code:\n```python\nx = 1\n```\n## step 99\n"
    log.eval(10, {"val_loss": 2.0}, {"`tick`": tricky})
    log.eval(20, {"val_loss": 1.9}, {"`tick`": "plain"})
    log.close()
    text = (tmp_path / "samples.md").read_text()
    assert [s for s, _ in sample_sections(text)] == [10, 20]
    assert "````text\n" + tricky.rstrip("\n") + "\n````" in text
    assert 'Prompt ``"`tick`"``:' in text


def test_plot_without_metrics_is_silent(tmp_path: Path) -> None:
    plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    (tmp_path / "metrics.jsonl").write_text("")
    plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_progress_bar_postfix() -> None:
    metrics = {"loss": 2.3451, "lr": 3e-4, "grad_norm": 0.912, "tokens_per_sec": 12_345.0, "mfu": 0.041}
    assert format_postfix(metrics) == "loss=2.345 lr=3.0e-04 gnorm=0.91 tok/s=12.3k mfu=4.1%"
    assert format_postfix({"loss": 1.0, "tokens_per_sec": 2.5e6}) == "loss=1.000 tok/s=2.50M"


def test_tensorboard_scalars_and_resume_purge(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, make_config(tensorboard=True), "tb", start_step=0, max_steps=30)
    drive(log, 1, 30)
    log.close()
    log = RunLog(tmp_path, make_config(tensorboard=True), "tb", start_step=15, max_steps=30)
    drive(log, 16, 30, offset=1.0)
    log.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [5, 10, 15, 20, 25, 30]  # the first run's 20..30 are purged
    expected = [loss_at(s) for s in (5, 10, 15)] + [loss_at(s, 1.0) for s in (20, 25, 30)]
    assert [e.value for e in loss] == pytest.approx(expected, rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [10, 20, 30]
    assert {"train/lr", "train/mfu", "train/tokens", "val/ppl"} <= set(events.Tags()["scalars"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, inside MLflow
def test_mlflow_run_params_metrics_and_resume(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    log = RunLog(tmp_path, make_config(mlflow=True), "mlf", start_step=0, max_steps=30)
    drive(log, 1, 30)
    log.close()
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    client = MlflowClient(mlflow_local_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.info.run_name == "mlf" and run.info.status == "FINISHED"
    assert run.data.params["model.n_layer"] == "4" and run.data.params["log.every"] == "5"
    history = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(loss_at(s))) for s in range(5, 31, 5)]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [10, 20, 30]

    with pytest.raises(RuntimeError):
        log = RunLog(tmp_path, make_config(mlflow=True), "mlf", start_step=30, max_steps=40)
        try:
            assert client.get_run(run_id).info.status == "RUNNING"
            log.train(40, {"loss": 0.5})
            raise RuntimeError("the trainer fails")
        finally:
            log.close()  # sees the exception: the MLflow run is marked failed
    assert (tmp_path / "mlflow_run_id").read_text().strip() == run_id  # the same run goes on
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_metric_history(run_id, "train_loss")[-1].step == 40


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        GptkitError, match=r"log.wandb is on but wandb is not installed; pip install 'gptkit\[wandb\]'"
    ):
        RunLog(tmp_path, make_config(wandb=True), "w", start_step=0, max_steps=30)


def wandb_history(path: Path) -> list[dict[str, float]]:
    """The history rows of an offline W&B run file, read with W&B's own protobuf schema.

    The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each
    with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, part, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (kind == 0 and length == 0):  # block trailer or padding
            pos += room
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record.FromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item  # "train/loss" is stored as the nested key ("train", "loss")
                rows.append({i.key or "/".join(i.nested_key): float(i.value_json) for i in items})
    return rows


def test_wandb_offline_run_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (extra gptkit[wandb])")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLog(tmp_path, make_config(wandb=True), "w", start_step=0, max_steps=10)
    for step in range(1, 6):  # logged every 5 steps: step 5
        log.train(step, {"loss": 10.0 - step, "lr": 1e-3})
    log.close("stopped")
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    log = RunLog(tmp_path, make_config(wandb=True), "w", start_step=5, max_steps=10)
    for step in range(6, 11):  # step 10
        log.train(step, {"loss": 10.0 - step, "lr": 1e-3})
    log.eval(10, {"val_loss": 1.5, "val_ppl": math.exp(1.5)})
    log.close()
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id, "a resumed run continues the W&B run"
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, "two processes' offline records, under the one run id"
    rows = [r for f in files for r in wandb_history(f)]
    train = [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [(r["_step"], r["val/loss"]) for r in rows if "val/loss" in r]
    assert train == [(5, 5.0), (10, 0.0)]
    assert val == [(10, 1.5)]
