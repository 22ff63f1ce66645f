"""`gptkit train`: exact resume, crash safety, accumulation, memorisation, rotation, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, wait_for_step

from gptkit.api import info, prepare
from gptkit.checkpoint import clean_state_dict, load_checkpoint, newest_intact, step_files
from gptkit.config import RunConfig, load_config
from gptkit.data.batch import Batch
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.runtime import resolve_runtime
from gptkit.tokenizer import Tokenizer
from gptkit.training.launch import train
from gptkit.training.parts import Parts
from gptkit.training.trainer import Trainer


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTKIT_NO_PROGRESS", "1")


def config(tmp_path: Path, data: Path, *overrides: str) -> RunConfig:
    return load_config(None, [*TINY_RUN, f"data.path={data}", f"runs_dir={tmp_path / 'runs'}", *overrides])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["split"] == split]


@pytest.mark.parametrize("sampling", ["random", "ordered"])
def test_resume_is_exact(tmp_path: Path, char_data: Path, sampling: str) -> None:
    """2N steps in one go == N steps, stop, --resume latest, N more (dropout on, so RNG state matters)."""
    common = [
        f"data.sampling={sampling}",
        "model.dropout=0.1",
        "eval.every=4",
        "checkpoint.every_steps=0",
        "train.max_steps=12",
    ]
    whole = train(config(tmp_path, char_data, "name=whole", *common))
    first = train(config(tmp_path, char_data, "name=split", *common), stop_at=6)
    assert first.step == 6 and first.stopped_early
    second = train(config(tmp_path, char_data, "name=split", *common), resume="latest")
    assert first.train_losses + second.train_losses == whole.train_losses
    a, b = weights(whole.checkpoint), weights(second.checkpoint)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    logged = [m["loss"] for m in metrics(tmp_path / "runs" / "split")]
    assert logged == whole.train_losses, "metrics.jsonl holds each step once"
    assert [m["val_loss"] for m in metrics(tmp_path / "runs" / "split", "val")] == [
        m["val_loss"] for m in metrics(whole.run_dir, "val")
    ]


def test_logged_learning_rates_follow_the_schedule(tmp_path: Path, char_data: Path) -> None:
    whole = train(config(tmp_path, char_data, "name=w", "train.max_steps=8", "eval.every=0"))
    lrs = [m["lr"] for m in metrics(whole.run_dir)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(6e-5)


class ListSource:
    """A fixed list of batches, for comparing optimisation steps on exactly the same data."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.i = batches, 0

    def next_batch(self) -> Batch:
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def bare_trainer(
    cfg: RunConfig, run_dir: Path, model: GPT, tokenizer: Tokenizer, source: ListSource
) -> Trainer:
    """A Trainer on given parts, without launch's run folder and data checks."""
    runtime = resolve_runtime(cfg.train, cfg.model)
    return Trainer(Parts(cfg, model, tokenizer, source, None, runtime), run_dir, run_dir.name)


def one_step(tmp_path: Path, data: Path, batches: list[Batch], *overrides: str) -> tuple[GPT, float]:
    cfg = config(tmp_path, data, "model.vocab_size=104", "train.max_steps=1", *overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    trainer = bare_trainer(cfg, tmp_path / "r", model, None, ListSource(batches))  # type: ignore[arg-type]
    _, norm, _ = trainer.train_step()
    return model, norm


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path, char_data: Path) -> None:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 104, (8, 33), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    big, n1 = one_step(tmp_path, char_data, [Batch(x, y)], "train.micro_batch_size=8")
    small, n2 = one_step(
        tmp_path,
        char_data,
        [Batch(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)],
        "train.micro_batch_size=2",
        "train.tokens_per_step=256",
    )
    assert n1 == pytest.approx(n2, abs=1e-6)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        assert float((a - b).abs().max()) <= 1e-6, name


def step_gradients(
    tmp_path: Path, data: Path, batches: list[Batch], *overrides: str
) -> tuple[float, dict[str, torch.Tensor]]:
    """One training step on `batches`: its logged loss and the (unclipped) gradients it applied."""
    cfg = config(tmp_path, data, "model.vocab_size=104", "train.max_steps=1", "train.grad_clip=0", *overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    trainer = bare_trainer(cfg, tmp_path / "r", model, None, ListSource(batches))  # type: ignore[arg-type]
    grads: dict[str, torch.Tensor] = {}

    def keep(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(keep)
    loss, _, _ = trainer.train_step()
    return loss, grads


def test_every_target_weighs_the_same_however_the_step_is_cut(tmp_path: Path, char_data: Path) -> None:
    """8 rows with uneven padding (IGNORE_INDEX), as 1 micro-batch of 8 and as 4 of 2: the same loss,
    the mean over all the step's targets, and the same gradients. The mean of the micro-batches'
    means (what a step gave before) is another number."""
    from gptkit.fused_loss import IGNORE_INDEX, next_token_loss

    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 104, (8, 33), generator=g)
    x, y = data[:, :-1], data[:, 1:].clone()
    for row, kept in enumerate([32, 3, 30, 5, 17, 1, 28, 9]):
        y[row, kept:] = IGNORE_INDEX
    pairs = [Batch(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    whole, g1 = step_gradients(tmp_path, char_data, [Batch(x, y)], "train.micro_batch_size=8")
    cut, g4 = step_gradients(
        tmp_path, char_data, pairs, "train.micro_batch_size=2", "train.tokens_per_step=256"
    )
    assert abs(whole - cut) <= 1e-6
    assert g1.keys() == g4.keys() and len(g1) > 0
    for name, grad in g1.items():
        assert float((grad - g4[name]).abs().max()) <= 1e-6, name
    torch.manual_seed(0)
    model = GPT(config(tmp_path, char_data, "model.vocab_size=104").model)
    with torch.no_grad():
        token_mean = float(next_token_loss(model, x, y))
    assert abs(whole - token_mean) <= 1e-6
    # the old formula: each micro-batch's mean / their number
    per_micro = 0.0
    for b in pairs:
        loss = next_token_loss(model, b.ids, b.targets) / len(pairs)
        loss.backward()
        per_micro += float(loss.detach())
    assert abs(per_micro - token_mean) > 1e-4
    assert max(float((p.grad - g4[n]).abs().max()) for n, p in model.named_parameters()) > 1e-4


def test_clipping_caps_the_gradient_and_logs_the_pre_clip_norm(tmp_path: Path, char_data: Path) -> None:
    g = torch.Generator().manual_seed(2)
    data = torch.randint(0, 104, (4, 33), generator=g)
    cfg = config(tmp_path, char_data, "model.vocab_size=104", "train.grad_clip=0.01")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    source = ListSource([Batch(data[:, :-1], data[:, 1:])])
    trainer = bare_trainer(cfg, tmp_path / "r", model, None, source)  # type: ignore[arg-type]
    seen = []

    def record(optimizer: torch.optim.Optimizer, *_: object) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        )

    trainer.optimizer.register_step_pre_hook(record)
    _, norm, _ = trainer.train_step()
    assert norm > 0.1, "the logged norm is the one before clipping"
    assert seen[0] == pytest.approx(0.01, rel=1e-3)


def test_tiny_model_memorises_a_tiny_text(tmp_path: Path) -> None:
    src = tmp_path / "poem.txt"
    src.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    prepare([str(src)], tmp_path / "poem", tokenizer="char", val_fraction=0.0, progress=False, workers=1)
    result = train(
        config(
            tmp_path,
            tmp_path / "poem",
            "train.max_steps=150",
            "train.lr=1e-2",
            "train.min_lr=1e-3",
            "eval.every=0",
            "eval.sample_tokens=0",
            "train.micro_batch_size=8",
        )
    )
    assert result.train_losses[-1] < 0.1, result.train_losses[-5:]


def test_rotation_keeps_the_best_and_best_survives_resume(tmp_path: Path, char_data: Path) -> None:
    cfg = config(
        tmp_path,
        char_data,
        "name=rot",
        "train.max_steps=12",
        "eval.every=2",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
    )
    train(cfg)
    run = tmp_path / "runs" / "rot"
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    files = [p.name for _, p in step_files(run)]
    assert best["file"] in files
    assert files[-2:] == ["step_00000011.pt", "step_00000012.pt"]
    assert len(files) <= 3
    vals = [m["val_loss"] for m in metrics(run, "val")]
    assert best["val_loss"] == pytest.approx(min(vals))
    # make the best an early one (by hand: worse later val losses are unlikely in a short run)
    (run / "checkpoints" / "best.json").write_text(json.dumps({**best, "val_loss": -1.0}))
    more = config(
        tmp_path,
        char_data,
        "name=rot",
        "train.max_steps=16",
        "eval.every=2",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
    )
    train(more, resume="latest")
    files = [p.name for _, p in step_files(run)]
    assert (
        best["file"] in files
        and json.loads((run / "checkpoints" / "best.json").read_text())["val_loss"] == -1.0
    )


def test_checkpoints_from_wrapped_models_load_into_a_plain_model(tmp_path: Path) -> None:
    import torch.distributed as dist

    cfg = load_config(None, [*TINY_RUN, "model.vocab_size=50"])
    model = GPT(cfg.model)
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    plain = GPT(cfg.model)
    plain.load_state_dict(clean_state_dict(compiled.state_dict()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        plain.load_state_dict(clean_state_dict(ddp.state_dict()))
        # and the other way: a plain state dict loads into the wrapped module
        ddp.module.load_state_dict(clean_state_dict(plain.state_dict()))
    finally:
        dist.destroy_process_group()


def test_bad_input_is_reported_before_any_step(tmp_path: Path, char_data: Path) -> None:
    with pytest.raises(GptkitError, match=r"no meta.json.*gptkit prepare"):
        train(config(tmp_path, tmp_path / "missing"))
    with pytest.raises(GptkitError, match=r"tokens_per_step \(1000\) is not a multiple of .* \(128\)"):
        train(config(tmp_path, char_data, "train.tokens_per_step=1000"))
    with pytest.raises(GptkitError, match=r"vocab_size is 50 but the data's tokenizer has 104"):
        train(config(tmp_path, char_data, "model.vocab_size=50"))
    train(config(tmp_path, char_data, "name=a", "train.max_steps=2"))
    with pytest.raises(GptkitError, match=r"already holds checkpoints; continue it with --resume latest"):
        train(config(tmp_path, char_data, "name=a", "train.max_steps=2"))
    with pytest.raises(GptkitError, match=r"model shape differs from checkpoint .*n_embd 32 -> 64"):
        train(config(tmp_path, char_data, "name=a", "model.n_embd=64", "train.max_steps=4"), resume="latest")
    other = tmp_path / "other"
    prepare([], other, tokenizer="gpt2", progress=False, workers=1)
    with pytest.raises(GptkitError, match=r"different tokenizer \(gpt2\) than checkpoint"):
        train(config(tmp_path, other, "name=a", "model.vocab_size=104", "train.max_steps=4"), resume="latest")


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path, char_data: Path, capsys) -> None:
    train(config(tmp_path, char_data, "name=c", "train.max_steps=4", "checkpoint.every_steps=2"))
    run = tmp_path / "runs" / "c"
    newest = step_files(run)[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])
    result = train(config(tmp_path, char_data, "name=c", "train.max_steps=6"), resume="latest")
    assert result.step == 6
    err = capsys.readouterr().err
    assert "step_00000004.pt' is corrupt or truncated" in err and "falling back" in err
    assert "resuming from" in err and "step_00000002.pt (step 2)" in err


def test_nan_loss_skips_steps_then_stops(tmp_path: Path, char_data: Path, capsys) -> None:
    with pytest.raises(GptkitError, match=r"3 steps in a row had NaN/inf"):
        train(
            config(
                tmp_path,
                char_data,
                "train.lr=1e30",
                "train.warmup_steps=0",
                "train.grad_clip=0",
                "train.max_bad_steps=3",
                "train.max_steps=50",
                "eval.every=0",
            )
        )
    assert "skipping this update" in capsys.readouterr().err


# -- signals and crashes, in real processes --------------------------------------------------


def cli(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    cfg = tmp_path / "sig.yaml"
    cfg.write_text("")
    args = [*TINY_RUN, f"data.path={data}", f"runs_dir={tmp_path / 'runs'}", *extra]
    return [sys.executable, "-m", "gptkit", "train", str(cfg), *args]


@pytest.mark.slow
def test_sigint_saves_an_emergency_checkpoint_that_resumes_exactly(tmp_path: Path, char_data: Path) -> None:
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1"}
    args = ["model.dropout=0.1", "eval.every=0", "checkpoint.every_steps=0", "checkpoint.every_minutes=0"]
    proc = subprocess.Popen(
        cli(tmp_path, char_data, "train.max_steps=400", *args),
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "runs" / "sig"
    wait_for_step(run, 5, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resume with: gptkit train" in err and "--resume latest" in err
    ((stopped_at, ckpt),) = step_files(run)
    assert 5 <= stopped_at < 400
    assert "stopped early" in (run / "report.md").read_text()

    total = stopped_at + 5
    printed = re.search(r"resume with: gptkit (train .*--resume latest)", err)
    assert printed, err
    resumed = subprocess.run(  # the command it printed, as a user would paste it
        [sys.executable, "-m", "gptkit", *printed.group(1).split(), "--stop-at", str(total)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    straight = train(
        config(tmp_path, char_data, "name=straight", "train.max_steps=400", *args), stop_at=total
    )
    assert [m["loss"] for m in metrics(run)] == straight.train_losses


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_an_intact_checkpoint(tmp_path: Path, char_data: Path) -> None:
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1"}
    # a wider model so that each save takes a while, saved at every step
    args = [
        "model.n_embd=256",
        "model.n_head=4",
        "eval.every=0",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
    ]
    run = tmp_path / "runs" / "sig"
    delays = [0.0, 0.013, 0.029, 0.047, 0.071]
    for i, delay in enumerate(delays):
        resume = ["--resume", "latest"] if i else []
        proc = subprocess.Popen(
            cli(tmp_path, char_data, "train.max_steps=1000", *args) + resume,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_step(run, 3 * (i + 1), proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = subprocess.run(
        cli(tmp_path, char_data, "train.max_steps=1000", *args) + ["--resume", "latest", "--stop-at", "40"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr
    assert "resuming from" in final.stderr
    assert step_files(run)[-1][0] == 40


def logged_since(run: Path, step: int, since: float, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until this process (a record written after `since`) has logged `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
        records = [json.loads(line) for line in lines.splitlines() if line.endswith("}")]
        if any(r["step"] >= step and r["time"] >= since for r in records):
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.005)
    pytest.fail(f"step {step} never came")


@pytest.mark.slow
def test_ten_random_kills_then_resume_auto_give_the_uninterrupted_weights(
    tmp_path: Path, char_data: Path
) -> None:
    """The fault-injection loop: kill -9 at 10 random moments of a run saving every 2 steps, each
    time restarted with --resume auto (as a requeued job is); the last weights are bitwise those of
    a run never interrupted, and no temporary file is left behind."""
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    args = ["model.dropout=0.1", "eval.every=0", "checkpoint.every_steps=2", "train.max_steps=60"]
    run = tmp_path / "runs" / "sig"
    moments = random.Random(14)
    for _ in range(10):
        start = step_files(run)[-1][0] if step_files(run) else 0
        launched = time.time()
        proc = subprocess.Popen(
            cli(tmp_path, char_data, *args) + ["--resume", "auto"], env=env, stderr=subprocess.PIPE, text=True
        )
        logged_since(run, start + moments.randint(1, 4), launched, proc)
        time.sleep(moments.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert step_files(run)[-1][0] < 60, "every kill landed before the end"
    final = subprocess.run(
        cli(tmp_path, char_data, *args) + ["--resume", "auto"], env=env, capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr
    straight = subprocess.run(  # the same process setup (threads) as the killed ones
        cli(tmp_path, char_data, *args, "name=straight"), env=env, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr
    resumed = weights(step_files(run)[-1][1])
    uninterrupted = weights(step_files(tmp_path / "runs" / "straight")[-1][1])
    assert step_files(run)[-1][0] == 60
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name or ".partial-" in p.name]


def test_full_disk_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, char_data: Path, capsys
) -> None:
    """The checkpoints folder is a small tmpfs: the first save fits, later ones hit ENOSPC."""
    folder = tmp_path / "runs" / "full" / "checkpoints"
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        result = train(
            config(
                tmp_path,
                char_data,
                "name=full",
                "train.max_steps=4",
                "checkpoint.every_steps=1",
                "checkpoint.keep_last=5",
                "eval.every=0",
            )
        )
        assert result.step == 4
        err = capsys.readouterr().err
        assert "no space left on device" in err and "stay usable" in err
        saved = step_files(tmp_path / "runs" / "full")
        assert saved and saved[0][0] == 1
        for _, path in saved:
            assert load_checkpoint(path)["progress"]["step"] >= 1
        assert not [p for p in folder.iterdir() if p.name.startswith(".")], "no temporary file is left"
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_auto_micro_batch_fits_memory_and_keeps_the_step(tmp_path: Path, char_data: Path) -> None:
    result = train(
        config(
            tmp_path,
            char_data,
            "name=auto",
            "train.micro_batch_size=auto",
            "train.tokens_per_step=1024",
            "train.max_steps=2",
            "eval.every=0",
        )
    )
    saved = load_config(tmp_path / "runs" / "auto" / "config.yaml")
    micro = saved.train.micro_batch_size
    assert isinstance(micro, int) and 1 <= micro <= 32 and 1024 % (micro * 32) == 0
    assert result.tokens == 2 * 1024
    assert micro == 32, "a 30k-parameter model fits the largest micro-batch that divides the step"


def flip_tensor_bytes(path: Path, count: int = 16) -> None:
    """XOR `count` bytes in the middle of the largest tensor record of a torch.save zip file."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        record = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # a local header is 30 bytes plus the name and extra field; the record's bytes follow it
    name_len = int.from_bytes(data[record.header_offset + 26 : record.header_offset + 28], "little")
    extra_len = int.from_bytes(data[record.header_offset + 28 : record.header_offset + 30], "little")
    start = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_changed_tensor_byte_fails_the_content_check_and_resume_falls_back(
    tmp_path: Path, char_data: Path
) -> None:
    """torch loads a checkpoint with flipped tensor bytes without a word; the stored sha256 finds them."""
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1"}
    args = ["eval.every=0", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
    first = subprocess.run(
        cli(tmp_path, char_data, "train.max_steps=4", *args), env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "sig"
    newest = step_files(run)[-1][1]
    assert newest.name == "step_00000004.pt"
    flip_tensor_bytes(newest)
    with pytest.raises(GptkitError, match=r"step_00000004.pt' fails its content check"):
        load_checkpoint(newest)
    resumed = subprocess.run(
        cli(tmp_path, char_data, "train.max_steps=6", *args) + ["--resume", "latest"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "step_00000004.pt' fails its content check" in resumed.stderr
    assert "falling back to an earlier checkpoint" in resumed.stderr
    assert "step_00000002.pt (step 2)" in resumed.stderr
    assert load_checkpoint(step_files(run)[-1][1])["progress"]["step"] == 6


def test_checkpoints_without_a_stored_digest_still_load(tmp_path: Path, char_data: Path) -> None:
    """Checkpoints written before the sha256 was stored load unchecked; a stored one matches."""
    result = train(config(tmp_path, char_data, "name=old", "train.max_steps=2", "eval.every=0"))
    payload = torch.load(result.checkpoint, weights_only=True)
    assert len(payload.pop("sha256")) == 64
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert load_checkpoint(old)["progress"]["step"] == 2


def test_when_every_checkpoint_is_damaged_both_messages_give_one_way_out(
    tmp_path: Path, char_data: Path
) -> None:
    train(config(tmp_path, char_data, "name=dmg", "train.max_steps=4", "checkpoint.every_steps=2"))
    run = tmp_path / "runs" / "dmg"
    for _, path in step_files(run):
        path.write_bytes(path.read_bytes()[:1000])
    way_out = r"choose another run name \(name=\.\.\.\)"
    with pytest.raises(
        GptkitError, match=r"step_00000002.pt, step_00000004.pt: damaged.*move the folder away"
    ) as e:
        train(config(tmp_path, char_data, "name=dmg", "train.max_steps=6"), resume="latest")
    assert re.search(way_out, str(e.value)) and "start the run again" in str(e.value)
    with pytest.raises(GptkitError, match=way_out):
        train(config(tmp_path, char_data, "name=dmg", "train.max_steps=6"))
    with pytest.raises(
        GptkitError, match=r"step_00000002.pt, step_00000004.pt: damaged.*train the run again"
    ):
        newest_intact(run)  # sample, eval, export: not "train it first"
    with pytest.raises(GptkitError, match=r"step_00000004.pt: damaged"):
        info(str(run))
    run.rename(tmp_path / "damaged")  # the way out both messages name
    assert train(config(tmp_path, char_data, "name=dmg", "train.max_steps=2")).step == 2


def test_a_folder_with_an_earlier_runs_metrics_but_no_checkpoint_is_not_reused(
    tmp_path: Path, char_data: Path
) -> None:
    """Its metrics.jsonl was emptied and a stale eval.json kept; now it is refused, naming the fix."""
    run = tmp_path / "runs" / "stale"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 3.0}\n')
    (run / "eval.json").write_text("[]")
    with pytest.raises(
        GptkitError,
        match=r"holds an earlier run's metrics.jsonl, eval.json but no checkpoint.*"
        r"move the folder away or choose another run name",
    ):
        train(config(tmp_path, char_data, "name=stale", "train.max_steps=2"))
    with pytest.raises(GptkitError, match=r"no checkpoint to resume from .*move the folder away"):
        train(config(tmp_path, char_data, "name=stale", "train.max_steps=2"), resume="latest")
    assert (run / "metrics.jsonl").read_text().startswith('{"step": 1'), "nothing was replaced"
    # --resume auto (a requeued job that died before its first checkpoint) redoes the run
    assert train(config(tmp_path, char_data, "name=stale", "train.max_steps=2"), resume="auto").step == 2


def test_stop_at_must_be_after_the_starting_step(tmp_path: Path, char_data: Path) -> None:
    """--stop-at -3 used to run one step and stop; a step not after the resumed one did the same."""
    for bad in (-3, 0):
        with pytest.raises(
            GptkitError, match=rf"--stop-at {bad} is not after the step training starts from \(0\)"
        ):
            train(config(tmp_path, char_data, "name=s", "train.max_steps=6"), stop_at=bad)
    assert not (tmp_path / "runs" / "s").exists(), "refused before the run folder is made"
    assert (
        train(config(tmp_path, char_data, "name=s", "train.max_steps=6", "eval.every=0"), stop_at=2).step == 2
    )
    with pytest.raises(GptkitError, match=r"--stop-at 2 is not after the step training starts from \(2\)"):
        train(config(tmp_path, char_data, "name=s", "train.max_steps=6"), resume="latest", stop_at=2)


# -- issue 14: errors before and after step 1, NaN, damaged shards ----------------------------


def test_eval_inputs_are_checked_before_step_1(tmp_path: Path, shakespeare: Path) -> None:
    """configs/tiny.yaml's own prompt holds '"', which a char tokenizer built on Shakespeare lacks:
    training ran to the first evaluation, then died with no checkpoint (and again on resume)."""
    data = tmp_path / "shakespeare"
    prepare([str(shakespeare)], data, tokenizer="char", progress=False, workers=1)
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1"}
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    common = [str(tiny), *TINY_RUN, f"data.path={data}", f"runs_dir={tmp_path / 'runs'}", "eval.every=25"]
    for extra, message in [
        ([], "eval.prompts[0] 'The \"if\" statement' cannot be sampled from: character '\"' (U+0022)"),
        (["eval.tasks=[lambada]", "eval.task_data=nope", "eval.sample_tokens=0"], "lambada needs nope"),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", "gptkit", "train", *common, *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "parameters on" not in out.stderr, "before any work"
        assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()
        assert not step_files(tmp_path / "runs" / "tiny")


def write_ids(data: Path, split_index: int, offset: int, value: int) -> bytes:
    """Put `value` at `offset` of a train shard and record the shard's new sha256 in meta.json, as a
    tokenizer bug would write it; returns the shard's original bytes."""
    import hashlib

    meta = json.loads((data / "meta.json").read_text())
    entry = meta["splits"]["train"]["shards"][split_index]
    shard = data / entry["file"]
    original = shard.read_bytes()
    ids = np.frombuffer(original, dtype=meta["dtype"]).copy()
    ids[offset] = value
    shard.write_bytes(ids.tobytes())
    entry["sha256"] = hashlib.sha256(ids.tobytes()).hexdigest()
    (data / "meta.json").write_text(json.dumps(meta))
    return original


def test_an_error_after_step_1_saves_an_emergency_checkpoint_that_resumes_exactly(
    tmp_path: Path, char_data: Path
) -> None:
    """An id outside the vocabulary at step 6 was `IndexError: index out of range in self` and the
    five steps were lost; now it is one line, after an emergency checkpoint of step 5."""
    import shutil

    from gptkit.data.batches import ShardBatches
    from gptkit.data.shards import PreparedData

    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    meta_before = (data / "meta.json").read_text()
    args = ["data.sampling=ordered", "train.seed=1", "eval.every=0", "checkpoint.every_steps=0"]
    args += ["checkpoint.every_minutes=0", "train.max_steps=20"]
    source = ShardBatches(PreparedData.open(data).shards("train"), 4, 32, "ordered", seed=1)
    for _ in range(5):
        source.next_batch()
    shard, offset = source._ordered_starts(4)[0]  # the first window of step 6
    original = write_ids(data, shard, offset + 10, 65000)
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1"}
    out = subprocess.run(cli(tmp_path, data, *args), env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "holds token id 65000" in out.stderr and "the vocabulary has 104 ids" in out.stderr
    assert "saved an emergency checkpoint before stopping" in out.stderr
    assert "resume with: gptkit train" in out.stderr and out.stderr.index("resume with") < out.stderr.index(
        "error:"
    )
    run = tmp_path / "runs" / "sig"
    assert [s for s, _ in step_files(run)] == [5]

    shard_file = data / json.loads(meta_before)["splits"]["train"]["shards"][shard]["file"]
    shard_file.write_bytes(original)
    (data / "meta.json").write_text(meta_before)
    resumed = subprocess.run(
        cli(tmp_path, data, *args) + ["--resume", "latest", "--stop-at", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    straight = train(config(tmp_path, data, "name=straight", *args), stop_at=8)
    assert [m["loss"] for m in metrics(run)] == straight.train_losses


def test_no_checkpoint_with_nan_and_the_advice_names_a_sound_one(tmp_path: Path, char_data: Path) -> None:
    """lr=1e6: the advice said "lower lr and resume" while the checkpoints held diverged weights."""
    common = ["name=nan", "eval.every=0", "train.max_steps=50", "train.warmup_steps=0"]
    train(config(tmp_path, char_data, *common, "checkpoint.every_steps=2"), stop_at=4)
    run = tmp_path / "runs" / "nan"
    diverge = ["train.lr=1e6", "train.grad_clip=0", "train.max_bad_steps=3", "checkpoint.every_steps=1"]
    with pytest.raises(
        GptkitError, match=r"3 steps in a row had NaN/inf loss or gradients \(steps 6 to 8\)"
    ) as e:
        train(config(tmp_path, char_data, *common, *diverge), resume="latest")
    sound = run / "checkpoints" / "step_00000004.pt"
    assert f"--resume {sound} name=NEW_NAME" in str(e.value)
    # step 5's update diverged (its weights are finite but gave NaN): nothing after it was written
    assert [s for s, _ in step_files(run)] == [2, 4, 5]
    following = train(config(tmp_path, char_data, *common, "name=nan2"), resume=str(sound), stop_at=6)
    assert following.step == 6 and all(math.isfinite(x) for x in following.train_losses)

    cfg = config(tmp_path, char_data, "model.vocab_size=104", "train.max_steps=1")
    model = GPT(cfg.model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    from gptkit.tokenizer import CharTokenizer

    trainer = bare_trainer(cfg, tmp_path / "w", model, CharTokenizer.train(["ab"]), ListSource([]))
    assert trainer.save("periodic") is None and not step_files(tmp_path / "w"), "non-finite weights: no file"
