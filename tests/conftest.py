"""What the tests share: the real public data beside the project root (../shared/data), the one
small model, the settings of a small training run, and the built-in corpus prepared once a session."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # torch is imported when a test builds a model, not when pytest collects the CLI tests
    from gptkit.model import GPT

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPTKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """Path of a file in ../shared/data, or skip the test naming what is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (real test data lives in ../shared/data beside the project root)")
    return path


@pytest.fixture
def shakespeare() -> Path:
    return shared_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus prepared with the char tokenizer, once per test session (tests only read it)."""
    from gptkit.api import prepare

    out = tmp_path_factory.mktemp("data") / "pydoc"
    prepare([], out, tokenizer="char", progress=False, workers=1)
    return out


# A small training run, as `gptkit train` overrides: 2 layers, width 32, context 32, fp32, logs every step.
TINY_RUN = [
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


TINY_SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64}  # the small model's shape
# Llama's switches on the small shape: RMSNorm, SwiGLU, RoPE (theta not 10000), one key/value head for
# two query heads, no biases, an output layer of its own.
TINY_LLAMA = {
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "position": "rope",
    "rope_theta": 500000.0,
    "n_kv_head": 1,
    "bias": False,
    "tie_embeddings": False,
}
# Each switch alone, then all together: what the KV cache, the sampler and the adapters are tested on.
SWITCHES: dict[str, dict[str, Any]] = {
    "gpt2": {},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "rope": {"position": "rope"},
    "gqa": {"n_head": 4, "n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "untied": {"tie_embeddings": False},
    "llama": TINY_LLAMA,
}


def tiny_gpt(
    vocab_size: int = 101, *, seed: int = 0, scale: float = 1.0, random_vectors: bool = False, **shape: Any
) -> GPT:
    """The tests' small GPT, in eval mode: 2 layers, 2 heads, width 32, context 64 unless `shape` says
    otherwise (any ModelConfig field), initialised from `seed`.

    The default vocabulary (101) is not a multiple of 64, so the embedding has padding rows. `scale`
    multiplies every weight: 4-8 give peaked distributions without near-ties, for greedy tests.
    `random_vectors` draws every bias and LayerNorm gain from N(0.5, 0.1), so that no mapping error
    (export, import, kernels) hides behind a 0 or a 1.
    """
    import torch

    from gptkit.config import ModelConfig
    from gptkit.model import GPT

    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**TINY_SHAPE, "vocab_size": vocab_size, **shape}))
    with torch.no_grad():
        for p in model.parameters():
            if random_vectors and p.dim() == 1:
                p.normal_(mean=0.5, std=0.1)
            elif scale != 1.0:
                p.mul_(scale)
    return model.eval()


def assert_cached_decoding_equals_full_forward(model: GPT, rows: list[list[int]], steps: int) -> None:
    """Rows of different lengths share a left-padded cache: after the prefill and each of `steps`
    greedy steps, each row's logits equal the full forward of that row alone (1e-5)."""
    import torch

    longest = max(map(len, rows))
    rows = [list(r) for r in rows]
    cache = model.new_cache(len(rows))
    cache.set_padding(torch.tensor([longest - len(r) for r in rows]))
    with torch.no_grad():
        logits = model(torch.tensor([[0] * (longest - len(r)) + r for r in rows]), cache=cache)[:, -1]
        for _ in range(steps):
            for b, row in enumerate(rows):
                torch.testing.assert_close(logits[b], model(torch.tensor([row]))[0, -1], atol=1e-5, rtol=1e-5)
            nxt = logits.argmax(-1)
            for b, row in enumerate(rows):
                row.append(int(nxt[b]))
            logits = model(nxt[:, None], cache=cache)[:, -1]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until a training process has logged `step` in its run folder (or fail if it exits)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and sum(1 for _ in path.open()) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    pytest.fail(f"step {step} never came")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """End the zygote of the tests' `gptkit` commands (tests/cli.py), if one started."""
    import cli

    cli.stop()
