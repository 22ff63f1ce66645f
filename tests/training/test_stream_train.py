"""`gptkit train` with data.stream: two weighted sources (a prepared char folder and a jsonl file),
a shuffle buffer and best-fit packing resume exactly, through --stop-at, kill -9 and torchrun."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, wait_for_step

from gptkit.checkpoint import load_checkpoint, step_files
from gptkit.config import RunConfig, load_config
from gptkit.errors import GptkitError
from gptkit.training.launch import train

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "runs", "far"]


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTKIT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def words_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Documents of 2 to 30 words (8 to 200 characters: some longer than the 32-token window)."""
    path = tmp_path_factory.mktemp("stream") / "words.jsonl"
    rnd = random.Random(0)
    with path.open("w") as f:
        for i in range(400):
            text = f"doc {i}: " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 30)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def stream_args(char_data: Path, words: Path) -> list[str]:
    return [
        "data.stream=true",
        "data.tokenizer=char",
        f"data.sources=[{{path: '{char_data}', weight: 0.7}}, {{path: '{words}', weight: 0.3}}]",
        "data.shuffle_buffer=32",
        "data.pack=best_fit",
    ]


def config(tmp_path: Path, *overrides: str) -> RunConfig:
    return load_config(None, [*TINY_RUN, f"runs_dir={tmp_path / 'runs'}", *overrides])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def train_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if m["split"] == "train"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_streamed_resume_is_exact(tmp_path: Path, char_data: Path, words_jsonl: Path) -> None:
    """2N steps straight == N, stop, resume, N (dropout on; the buffer and open windows carry over)."""
    common = [*stream_args(char_data, words_jsonl), "model.dropout=0.1", "eval.every=0", "train.max_steps=16"]
    common += ["checkpoint.every_steps=0"]
    whole = train(config(tmp_path, "name=whole", *common))
    first = train(config(tmp_path, "name=split", *common), stop_at=8)
    assert first.step == 8 and first.stopped_early
    second = train(config(tmp_path, "name=split", *common), resume="latest")
    assert len(whole.train_losses) == 16
    resumed = first.train_losses + second.train_losses
    assert max(abs(a - b) for a, b in zip(resumed, whole.train_losses, strict=True)) <= 1e-6
    assert max_diff(weights(whole.checkpoint), weights(second.checkpoint)) <= 1e-6
    assert train_losses(tmp_path / "runs" / "split") == train_losses(whole.run_dir)
    records = [json.loads(line) for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in records if m["split"] == "train"][-1]
    shares = {k.removeprefix("share/"): v for k, v in last.items() if k.startswith("share/")}
    assert set(shares) == {str(char_data), str(words_jsonl)} and abs(sum(shares.values()) - 1) < 1e-9
    report = (whole.run_dir / "report.md").read_text()
    assert "## Data mixture" in report
    assert f"| `{words_jsonl}` | 30.0% | {shares[str(words_jsonl)]:.1%} |" in report


def test_resumes_that_cannot_continue_the_stream_are_one_line_errors(
    tmp_path: Path, char_data: Path, words_jsonl: Path
) -> None:
    """Another source list (or order), packing, seed, tokenizer or block size: one line naming the
    difference and the fix; the run then resumes with its own settings."""
    common = [*stream_args(char_data, words_jsonl), "eval.every=0", "train.max_steps=4", "name=r"]
    train(config(tmp_path, *common), stop_at=2)
    same = "resume with the checkpoint's data.sources, data.pack and train.seed"
    swapped = f"data.sources=[{{path: '{words_jsonl}', weight: 0.3}}, {{path: '{char_data}', weight: 0.7}}]"
    gpt2 = [f"data.sources=['{words_jsonl}']", "data.tokenizer=gpt2"]
    cases = [
        (["data.pack=concat"], same),
        ([f"data.sources=['{char_data}']"], same),
        ([swapped], same),
        (["train.seed=7"], same),
        (gpt2, "the streamed sources are tokenized with gpt2, another tokenizer than checkpoint"),
        (["model.block_size=16"], "the config's model shape differs from checkpoint .*block_size 32 -> 16"),
    ]
    for changed, message in cases:
        with pytest.raises(GptkitError, match=message) as e:
            train(config(tmp_path, *common, *changed), resume="latest")
        assert "\n" not in str(e.value), changed
    assert train(config(tmp_path, *common), resume="latest").step == 4


def cli(tmp_path: Path, *extra: str) -> list[str]:
    cfg = tmp_path / "kill.yaml"
    cfg.write_text("")
    runs = f"runs_dir={tmp_path / 'runs'}"
    return [sys.executable, "-m", "gptkit", "train", str(cfg), *TINY_RUN, runs, *extra]


@pytest.mark.slow
def test_kill_9_while_saving_then_resume_gives_the_straight_run(
    tmp_path: Path, char_data: Path, words_jsonl: Path
) -> None:
    """kill -9 at moments around checkpoint saves (every step), resume each time; the final weights and
    every logged loss equal a run that never stopped."""
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    args = [*stream_args(char_data, words_jsonl), "model.n_embd=128", "model.n_head=4", "eval.every=0"]
    args += ["checkpoint.every_steps=1", "checkpoint.keep_last=2", "train.max_steps=30", "name=k"]
    run = tmp_path / "runs" / "k"
    for i, delay in enumerate([0.0, 0.011, 0.023, 0.037]):
        resume = ["--resume", "latest"] if i else []
        proc = subprocess.Popen(cli(tmp_path, *args) + resume, env=env, stderr=subprocess.PIPE, text=True)
        wait_for_step(run, 3 * (i + 1), proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = subprocess.run(
        cli(tmp_path, *args) + ["--resume", "latest"], env=env, capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr
    assert "resuming from" in final.stderr
    straight = subprocess.run(
        cli(tmp_path, *[a for a in args if a != "name=k"], "name=s"), env=env, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr
    a, b = weights(step_files(run)[-1][1]), weights(step_files(tmp_path / "runs" / "s")[-1][1])
    assert step_files(run)[-1][0] == 30
    assert max_diff(a, b) <= 1e-6
    # metrics.jsonl of the killed run may hold a step twice (logged, then killed before its save)
    logged = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m["split"] == "train":
            logged[m["step"]] = m["loss"]
    expected = train_losses(tmp_path / "runs" / "s")
    assert max(abs(logged[i + 1] - expected[i]) for i in range(30)) <= 1e-6


def torchrun(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = cli(tmp_path, *extra)
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *cmd[1:]], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_see_the_global_batch_of_one_and_resume_with_another_count(
    tmp_path: Path, char_data: Path, words_jsonl: Path
) -> None:
    """One torchrun launch: 1 process (micro-batch 4) steps 1-4, 2 processes (micro-batch 2 each) resume
    it for steps 5-8, 1 process resumes those for 9-12; every loss and the final weights equal a
    straight 1-process run. Best-fit packing in windows of 128, which hold several documents: the
    ranks' rows hold different numbers of targets (padding, and each document's last position), and
    a step's loss is still the mean over all of the global batch's targets."""
    base = [*stream_args(char_data, words_jsonl), "eval.every=0", "train.max_steps=12"]
    base += ["checkpoint.every_steps=0", "model.block_size=128"]
    whole = train(config(tmp_path, *base, "name=whole"))
    train(config(tmp_path, *base, "name=mixed"), stop_at=4)
    two = torchrun(
        tmp_path, *base, "train.micro_batch_size=2", "name=mixed", "--resume", "latest", "--stop-at", "8"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert step_files(tmp_path / "runs" / "mixed")[-1][0] == 8
    last = train(config(tmp_path, *base, "name=mixed"), resume="latest")
    losses = train_losses(tmp_path / "runs" / "mixed")
    assert len(losses) == 12
    assert max(abs(a - b) for a, b in zip(losses, whole.train_losses, strict=True)) <= 1e-6
    # DDP sums the two halves' gradients, one process the whole batch's: fp32 rounding (as with shards)
    assert max_diff(weights(whole.checkpoint), weights(last.checkpoint)) <= 1e-5


def test_streamed_and_shard_states_are_not_swapped_on_resume(
    tmp_path: Path, char_data: Path, words_jsonl: Path
) -> None:
    common = ["eval.every=0", "train.max_steps=6", "name=x"]
    train(config(tmp_path, *stream_args(char_data, words_jsonl), *common), stop_at=2)
    with pytest.raises(GptkitError, match="the checkpoint's data state is for streamed sources"):
        train(config(tmp_path, f"data.path={char_data}", *common), resume="latest")
    common = ["eval.every=0", "train.max_steps=6", "name=y"]
    train(config(tmp_path, f"data.path={char_data}", *common), stop_at=2)
    changed = [*stream_args(char_data, words_jsonl), *common]
    with pytest.raises(GptkitError, match="the checkpoint's data state is for prepared shards"):
        train(config(tmp_path, *changed), resume="latest")


def test_a_source_that_runs_out_under_stop_ends_the_run_like_a_finished_one(
    tmp_path: Path, char_data: Path
) -> None:
    """`gptkit train` with when_exhausted=stop: a final checkpoint, the report, exit 0, and one line
    naming the source and its tokens (all of its one epoch: every document was drawn)."""
    small = tmp_path / "small.jsonl"
    texts = [
        f"doc {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 7 + 2)) for i in range(24)
    ]
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = [*stream_args(char_data, small), "data.when_exhausted=stop", "train.max_steps=1000", "name=s"]
    args += ["eval.every=0", "checkpoint.every_steps=0"]
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cli(tmp_path, *args), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tokens = sum(len(t) + 1 for t in texts)  # char tokens and an end-of-text per document
    run = tmp_path / "runs" / "s"
    step = step_files(run)[-1][0]
    line = f"source {str(small)!r} ran out after {tokens:,} tokens and 1 epoch(s) (data.when_exhausted=stop)"
    assert f"gptkit: {line}; the run ends at step {step}" in out.stderr.splitlines()
    assert 0 < step < 1000
    assert f"**Status:** finished: {line}" in (run / "report.md").read_text()
    assert len(train_losses(run)) == step
    assert "error" not in out.stderr.lower()


def val_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["val_loss"] for m in lines if m["split"] == "val" and "val_loss" in m]


def test_streamed_runs_measure_val_loss_on_val_sources_or_a_prepared_sources_val_split(
    tmp_path: Path, char_data: Path, words_jsonl: Path
) -> None:
    """data.val_sources (a jsonl) gives val loss; without it, the prepared source's val split does;
    the windows are fixed: two runs of the same weights measure the same loss."""
    held = tmp_path / "held.jsonl"
    held.write_text(
        "".join(json.dumps({"text": f"held out {i}: " + " ".join(WORDS)}) + "\n" for i in range(20))
    )
    common = [*stream_args(char_data, words_jsonl), "train.max_steps=4", "eval.every=2"]
    with_val = train(config(tmp_path, *common, "name=v", f"data.val_sources=['{held}']"))
    assert len(val_losses(with_val.run_dir)) == 2 and with_val.val_loss == val_losses(with_val.run_dir)[-1]
    assert "best val loss" in (with_val.run_dir / "report.md").read_text()
    own = train(config(tmp_path, *common, "name=own"))
    assert len(val_losses(own.run_dir)) == 2
    assert own.val_loss != with_val.val_loss  # another set of windows: the prepared folder's val split
    again = train(config(tmp_path, *common, "name=again", f"data.val_sources=['{held}']"))
    assert again.val_loss == with_val.val_loss
    raw_only = [f"data.sources=['{words_jsonl}']", "data.stream=true", "data.tokenizer=gpt2"]
    no_val = train(config(tmp_path, *raw_only, "train.max_steps=1", "name=raw", "model.block_size=32"))
    assert no_val.val_loss is None
