"""`gptkit train`: exact resume, crash safety, accumulation, memorisation, rotation, bad input."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptkit.api import prepare
from gptkit.checkpoint import clean_state_dict, load_checkpoint
from gptkit.config import RunConfig, load_config
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.training.batches import Batch
from gptkit.training.checkpoints import step_files
from gptkit.training.launch import train
from gptkit.training.trainer import Trainer

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.micro_batch_size=4",
    "train.lr=3e-3",
    "train.warmup_steps=3",
    "train.precision=fp32",
    "eval.batches=2",
    "eval.sample_tokens=8",
    "log.every=1",
]


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTKIT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "pydoc"
    prepare([], out, tokenizer="char", progress=False, workers=1)
    return out


def config(tmp_path: Path, data: Path, *overrides: str) -> RunConfig:
    return load_config(None, [*TINY, f"data.path={data}", f"runs_dir={tmp_path / 'runs'}", *overrides])


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


def one_step(tmp_path: Path, data: Path, batches: list[Batch], *overrides: str) -> tuple[GPT, float]:
    cfg = config(tmp_path, data, "model.vocab_size=104", "train.max_steps=1", *overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    trainer = Trainer(cfg, tmp_path / "r", "r", model, None, ListSource(batches), None)  # type: ignore[arg-type]
    _, norm, _ = trainer.train_step()
    return model, norm


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path, char_data: Path) -> None:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 104, (8, 33), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    big, n1 = one_step(tmp_path, char_data, [(x, y)], "train.micro_batch_size=8")
    small, n2 = one_step(
        tmp_path,
        char_data,
        [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)],
        "train.micro_batch_size=2",
        "train.tokens_per_step=256",
    )
    assert n1 == pytest.approx(n2, abs=1e-6)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        assert float((a - b).abs().max()) <= 1e-6, name


def test_clipping_caps_the_gradient_and_logs_the_pre_clip_norm(tmp_path: Path, char_data: Path) -> None:
    g = torch.Generator().manual_seed(2)
    data = torch.randint(0, 104, (4, 33), generator=g)
    cfg = config(tmp_path, char_data, "model.vocab_size=104", "train.grad_clip=0.01")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    trainer = Trainer(cfg, tmp_path / "r", "r", model, None, ListSource([(data[:, :-1], data[:, 1:])]), None)  # type: ignore[arg-type]
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

    cfg = load_config(None, [*TINY, "model.vocab_size=50"])
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
    args = [*TINY, f"data.path={data}", f"runs_dir={tmp_path / 'runs'}", *extra]
    return [sys.executable, "-m", "gptkit", "train", str(cfg), *args]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and sum(1 for _ in path.open()) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    pytest.fail(f"step {step} never came")


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
