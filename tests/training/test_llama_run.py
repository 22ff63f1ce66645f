"""A Llama-style run (llama-tiny's switches, shrunk) through the real CLI: it trains (the loss falls),
resumes exactly, refuses a resume with other switches, fine-tunes with LoRA on Llama's projection
names, and is evaluated and sampled."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cli import gptkit_cli
from conftest import TINY_RUN

from gptkit.config import load_config
from gptkit.errors import GptkitError
from gptkit.training.launch import train

# llama-tiny's switches (rmsnorm, swiglu, rope, GQA 4:2, no bias, tied) at the tests' small shape
LLAMA_RUN = [
    *TINY_RUN,
    "model.preset=llama-tiny",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.mlp_hidden=96",
]


def gptkit(*args: str) -> subprocess.CompletedProcess[str]:
    run = gptkit_cli(*args, env={**os.environ, "GPTKIT_NO_PROGRESS": "1"}, timeout=900)
    assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory, char_data: Path) -> Path:
    """30 steps of the Llama-style model on the built-in corpus, trained once for this module."""
    root = tmp_path_factory.mktemp("llama")
    cfg = root / "llama.yaml"
    cfg.write_text("")
    args = [*LLAMA_RUN, f"data.path={char_data}", f"runs_dir={root / 'runs'}", "name=llama"]
    gptkit("train", str(cfg), *args, "train.max_steps=30", "eval.every=0")
    return root / "runs" / "llama"


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if m["split"] == "train"]


def test_the_llama_run_trains(llama_run: Path) -> None:
    got = losses(llama_run)
    assert len(got) == 30
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.5, got
    info = gptkit("info", str(llama_run)).stdout
    assert "rmsnorm" in info and "rope" in info


def test_the_llama_run_resumes_exactly(tmp_path: Path, char_data: Path) -> None:
    common = [*LLAMA_RUN, f"data.path={char_data}", f"runs_dir={tmp_path}", "model.dropout=0.1"]
    common += ["checkpoint.every_steps=0", "train.max_steps=10", "eval.every=5"]
    whole = train(load_config(None, [*common, "name=whole"]))
    first = train(load_config(None, [*common, "name=split"]), stop_at=5)
    second = train(load_config(None, [*common, "name=split"]), resume="latest")
    assert first.train_losses + second.train_losses == whole.train_losses
    with pytest.raises(GptkitError, match=r"differs from checkpoint .*position rope -> learned"):
        train(load_config(None, [*common, "name=split", "model.position=learned"]), resume="latest")


def test_lora_on_llama_projections_then_eval_and_sample(llama_run: Path, char_data: Path) -> None:
    cfg = llama_run.parent.parent / "lora.yaml"
    cfg.write_text("")
    args = [*TINY_RUN, f"finetune.base={llama_run}", "finetune.method=lora", f"data.path={char_data}"]
    args += ["finetune.lora.targets=[q_proj,v_proj,gate_proj,down_proj]", "data.instructions=null"]
    args += [f"runs_dir={llama_run.parent}", "name=lora", "train.max_steps=6", "eval.every=0"]
    args = [a for a in args if not a.startswith("model.")]  # the base's model
    gptkit("finetune", str(cfg), *args)
    lora = llama_run.parent / "lora"
    assert len(losses(lora)) == 6
    adapter = json.loads((lora / "adapter" / "adapter_config.json").read_text())
    # saved in peft's layout under HF Llama's names (q_proj: rows 0:32 of c_attn, down_proj: mlp.c_proj)
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj", "gate_proj", "down_proj"}
    ppl = json.loads(
        gptkit("eval", str(lora), "--tasks", "perplexity", "--text", str(char_data), "--json").stdout
    )
    assert "perplexity" in json.dumps(ppl)
    sample = gptkit("sample", str(lora), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0")
    assert sample.stdout.strip()
    assert "decodes through PyTorch" in sample.stderr  # the CPU kernel computes GPT-2's layers only
