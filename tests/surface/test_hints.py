"""Hints name the syntax that works: the CLI flag, the command that takes the option, the full key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptkit.config import load_config
from gptkit.errors import GptkitError
from gptkit.eval.tasks import find_task_file
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer


def test_a_bare_key_of_a_section_suggests_the_full_dotted_key() -> None:
    with pytest.raises(GptkitError, match=r"unknown key 'lr' \(did you mean 'train.lr'\?\)"):
        load_config(None, ["lr=3e-4"])
    with pytest.raises(
        GptkitError, match=r"unknown key 'model.max_steps' \(did you mean 'train.max_steps'\?\)"
    ):
        load_config(None, ["model.max_steps=3"])
    with pytest.raises(GptkitError, match=r"'finetune.lora.r'"):
        load_config(None, ["r=4"])
    with pytest.raises(GptkitError, match=r"did you mean 'n_layer'"):  # a typo in the right section
        load_config(None, ["model.n_layr=4"])


def test_the_cli_says_lr_is_train_lr(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gptkit", "train", "configs/tiny.yaml", "lr=3e-4"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 2 and "did you mean 'train.lr'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_names_the_flag() -> None:
    from gptkit.device import pick_device

    with pytest.raises(GptkitError, match=r"use --device auto or --device cpu"):
        pick_device("cuda")


def test_a_missing_hellaswag_file_names_every_accepted_layout(tmp_path: Path) -> None:
    with pytest.raises(GptkitError) as e:
        find_task_file("hellaswag", tmp_path)
    for name in ("hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt"):
        assert name in str(e.value)


def test_gguf_of_a_char_model_names_the_prepare_option(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from gptkit.interop.gguf import export_gguf

    tok = CharTokenizer.train(["hello world"])
    config = load_config(
        None, ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16"]
    )
    model = GPT(config.model.model_copy(update={"vocab_size": tok.vocab_size}))
    with pytest.raises(GptkitError, match=r"prepare the data with gptkit prepare --tokenizer gpt2"):
        export_gguf(model, tok, tmp_path / "m.gguf")
