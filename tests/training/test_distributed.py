"""Training in 2 processes under torchrun (gloo on CPU): the same steps as one process.

2 processes with micro-batch B and 1 process with micro-batch 2B draw the same global batches, so
their losses and weights must agree, for GPT-2 and for a Llama-style model; checkpoints move
between process counts; a lost rank ends the job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from gptkit.api import prepare
from gptkit.checkpoint import load_checkpoint
from gptkit.loading import load_model
from gptkit.training.budget import flops_per_token

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")

CONFIG = """\
model: {n_layer: 2, n_head: 2, n_embd: 32, block_size: 32}
train: {max_steps: 20, lr: 3.0e-3, warmup_steps: 3, precision: fp32, tokens_per_step: 512}
eval: {every: 10, batches: 2, sample_tokens: 8}
checkpoint: {every_steps: 0, every_minutes: 0}
log: {every: 1}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    prepare([], data, tokenizer="char", progress=False, workers=1)
    cfg = root / "cfg.yaml"
    cfg.write_text(CONFIG + f"data: {{path: {data}}}\nruns_dir: {root / 'runs'}\n")
    return root, cfg


def gptkit_train(cfg: Path, *args: str, procs: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """`gptkit train` in one process, or under torchrun with `procs` processes."""
    launcher = [sys.executable, "-m", "gptkit"]
    if procs > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
        ]
        launcher += ["-m", "gptkit"]
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*launcher, "train", str(cfg), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if m["split"] == "train"]


def mfu_per_token(run: Path) -> float:
    """MFU / tokens per second: FLOPs per token over the ceiling the run measured (the same each step)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ratios = [m["mfu"] / m["tokens_per_sec"] for m in lines if m["split"] == "train"]
    assert max(ratios) <= min(ratios) * (1 + 1e-9)
    return ratios[0]


def final_weights(run: Path, step: int = 20) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / f"step_{step:08d}.pt")["model"]


def assert_same_training(a: Path, b: Path, tolerance: float = 1e-5) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 20
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) <= tolerance, (la, lb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 1e-5, worst


# llama-tiny's switches (RMSNorm, SwiGLU, RoPE, GQA, no biases) at the width of CONFIG's model
LLAMA = ["model.preset=llama-tiny", "model.n_head=4", "model.n_kv_head=2", "model.mlp_hidden=64"]
ARCHITECTURES = {"gpt2": [], "llama": LLAMA}


@pytest.fixture(scope="module")
def one_process(setup: tuple[Path, Path]) -> Path:
    """The reference: 1 process, micro-batch 8 (2 accumulation steps of 256 tokens)."""
    root, cfg = setup
    gptkit_train(cfg, "name=one", "train.micro_batch_size=8")
    return root / "runs" / "one"


@pytest.fixture(scope="module")
def one_process_llama(setup: tuple[Path, Path]) -> Path:
    """The same reference for the Llama-style model."""
    root, cfg = setup
    gptkit_train(cfg, "name=one-llama", "train.micro_batch_size=8", *LLAMA)
    return root / "runs" / "one-llama"


# The Llama-style model under DDP is test_checkpoint_resumes_with_another_number_of_processes[2-1]'s
@pytest.mark.parametrize(("strategy", "arch"), [("ddp", "gpt2"), ("fsdp", "gpt2"), ("fsdp", "llama")])
def test_two_processes_train_like_one(
    setup: tuple[Path, Path], request: pytest.FixtureRequest, strategy: str, arch: str
) -> None:
    root, cfg = setup
    one_process = request.getfixturevalue("one_process" if arch == "gpt2" else "one_process_llama")
    name = f"two-{strategy}" if arch == "gpt2" else f"two-{strategy}-{arch}"
    args = [f"name={name}", "train.micro_batch_size=4", f"train.distributed={strategy}", *ARCHITECTURES[arch]]
    out = gptkit_train(cfg, *args, procs=2)
    assert out.stderr.count("parameters on cpu") == 1, "only rank 0 speaks"
    assert out.stdout.count("run folder:") == 1 and out.stdout.count("--- sample at step 20 ---") == 1, (
        out.stdout
    )
    run = root / "runs" / name
    if arch == "llama":
        assert load_checkpoint(run / "checkpoints" / "step_00000020.pt")["config"]["model"]["mlp"] == "swiglu"
    assert_same_training(one_process, run)  # 1e-5: a loss of ~4.6 is 2 float32 ulps from 1e-6
    # MFU divides all processes' tokens by all processes' ceilings (it reached 109.7% with one's)
    ceiling = re.search(
        r"MFU against ([\d.e+-]+) TFLOP/s, the measured matmul ceiling of 2 processes together", out.stderr
    )
    assert ceiling, out.stderr
    model = load_model(load_checkpoint(run / "checkpoints" / "step_00000020.pt"))[0]
    expected = flops_per_token(model.config, model.num_params()) / (float(ceiling.group(1)) * 1e12)
    assert mfu_per_token(run) == pytest.approx(expected, rel=1e-3)
    state = load_checkpoint(run / "checkpoints" / "step_00000020.pt")["state"]
    assert len(state["rng_ranks"]) == 2, "each rank's generators are kept"


@pytest.mark.parametrize(("first", "then", "arch"), [(2, 1, "llama"), (1, 2, "gpt2")])
def test_checkpoint_resumes_with_another_number_of_processes(
    setup: tuple[Path, Path], request: pytest.FixtureRequest, first: int, then: int, arch: str
) -> None:
    """Stopped at step 10 and resumed with the other number of processes, the run is the 1-process
    run; 2 -> 1 is the Llama-style model's DDP check too (its 10 steps at 2 processes)."""
    root, cfg = setup
    one_process = request.getfixturevalue("one_process" if arch == "gpt2" else "one_process_llama")
    name = f"resume-{first}-{then}"
    micro = {1: "train.micro_batch_size=8", 2: "train.micro_batch_size=4"}
    switches = ARCHITECTURES[arch]
    gptkit_train(
        cfg, f"name={name}", micro[first], *switches, "--stop-at", "10", "--resume", "auto", procs=first
    )
    gptkit_train(cfg, f"name={name}", micro[then], *switches, "--resume", "auto", procs=then)
    assert_same_training(one_process, root / "runs" / name)


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_rank_ends_the_job(setup: tuple[Path, Path], fault: str) -> None:
    """A rank killed (SIGKILL) or frozen (SIGSTOP: it hangs, holding its sockets open) ends the job
    with a non-zero exit and a message, in bounded time: at once, or after the collective timeout."""
    root, cfg = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "gptkit", "train", str(cfg), f"name={fault}", "train.max_steps=100000"]
    cmd += ["train.micro_batch_size=4", "eval.every=0", "train.dist_timeout_minutes=0.25"]
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = root / "runs" / fault / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert job.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    children = psutil.Process(job.pid).children(recursive=True)
    workers = [p for p in children if "gptkit" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    start = time.monotonic()
    try:
        _, err = job.communicate(timeout=180)
    finally:
        job.kill()
        for w in workers:
            if w.is_running():
                w.kill()
    assert job.returncode != 0
    assert time.monotonic() - start < 180
    assert "Root Cause" in err and "gptkit FAILED" in err, err[-3000:]
    if fault == "killed":
        assert "exitcode  : -9" in err, err[-3000:]
