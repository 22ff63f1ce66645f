"""Checkpoints (atomic, verified) and `gptkit info` on presets, configs, data, checkpoints and runs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from gptkit.checkpoint import clean_state_dict, load_checkpoint, save_checkpoint, step_files
from gptkit.config import RunConfig, load_config
from gptkit.describe import describe, format_info
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer


def make_checkpoint(path: Path, step: int = 10) -> tuple[GPT, CharTokenizer]:
    tok = CharTokenizer.train(["hello world"])
    config = load_config(None, ["model.preset=tiny", f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(step)
    model = GPT(config.model)
    save_checkpoint(
        path,
        model_state=model.state_dict(),
        config=config.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": step, "tokens": step * 1024},
    )
    return model, tok


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    model, tok = make_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"], "no temporary file is left"
    payload = load_checkpoint(path)
    config = RunConfig.model_validate(payload["config"])
    again = GPT(config.model)
    again.load_state_dict(payload["model"])
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert payload["progress"] == {"step": 10, "tokens": 10240}
    assert payload["tokenizer"] == tok.describe()


def test_wrapper_prefixes_are_stripped() -> None:
    state = {"_orig_mod.module.lm_head.weight": 1, "module.transformer.wte.weight": 2, "x.module.y": 3}
    assert clean_state_dict(state) == {"lm_head.weight": 1, "transformer.wte.weight": 2, "x.module.y": 3}


def test_damaged_checkpoints_are_named(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    make_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GptkitError, match=r"ckpt.pt' is corrupt or truncated"):
        load_checkpoint(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(GptkitError, match=r"is not a gptkit checkpoint"):
        load_checkpoint(path)
    with pytest.raises(GptkitError, match=r"not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    make_checkpoint(path)
    before = path.read_bytes()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # a lambda cannot be pickled
        save_checkpoint(path, model_state={"w": lambda: 0}, config={}, tokenizer={})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_info_on_a_checkpoint_and_a_run(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "demo"
    make_checkpoint(run / "checkpoints" / "step_000010.pt", step=10)
    newest = run / "checkpoints" / "step_000020.pt"
    make_checkpoint(newest, step=20)
    info = describe(str(newest))
    assert info["kind"] == "checkpoint" and info["progress"]["step"] == 20
    assert info["tokenizer"]["type"] == "char" and info["params"] > 0
    assert json.loads(json.dumps(info)) == info
    assert "progress: step 20, tokens 20,480" in format_info(info)

    assert step_files(run)[-1] == (20, newest)
    assert describe(str(run))["progress"]["step"] == 20
    # The newest checkpoint is damaged: the run falls back to the newest intact one.
    newest.write_bytes(b"garbage")
    os.utime(newest)
    info = describe(str(run))
    assert info["kind"] == "run" and info["progress"]["step"] == 10
    assert info["checkpoint"].endswith("step_000010.pt")


def test_info_on_a_config_uses_the_data_vocabulary(tmp_path: Path) -> None:
    from gptkit.api import prepare

    src = tmp_path / "t.txt"
    src.write_text("abcabc\n" * 100)
    prepare([str(src)], tmp_path / "d", tokenizer="char", progress=False, workers=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  preset: tiny\ndata:\n  path: {tmp_path / 'd'}\n")
    info = describe(str(cfg))
    assert info["model"]["vocab_size"] == 5 and info["tokenizer"] == {
        "type": "char",
        "vocab_size": 5,
        "eot_id": 4,
    }
    n_embd, block = 128, 128
    assert info["params"] - info["params_without_position"] == block * n_embd


def test_info_on_unknown_things(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match=r"did you mean 'gpt2-xl'"):
        describe("gpt2-xxl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptkitError, match=r"neither a run, a checkpoint"):
        describe(str(tmp_path / "empty"))


def test_info_prints_numbers_for_people_and_json_keeps_raw_values(tmp_path: Path) -> None:
    import subprocess
    import sys

    tok = CharTokenizer.train(["hello world"])
    config = load_config(None, ["model.preset=tiny", f"model.vocab_size={tok.vocab_size}"])
    path = tmp_path / "ckpt.pt"
    progress = {"step": 20, "tokens": 20480, "wall_seconds": 63.4988540760005, "best_val_loss": None}
    save_checkpoint(
        path,
        model_state=GPT(config.model).state_dict(),
        config=config.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress=progress | {"val_loss": 2.345678},
    )
    text = format_info(describe(str(path)))
    assert "training time 1m03s" in text and "63.49" not in text
    assert "best val loss none yet" in text and "None" not in text
    assert "val loss 2.3457" in text
    out = subprocess.run(
        [sys.executable, "-m", "gptkit", "info", str(path), "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["progress"]["wall_seconds"] == 63.4988540760005


def test_info_of_a_finetune_config_describes_the_base_it_uses(tmp_path: Path) -> None:
    cfg = tmp_path / "sft.yaml"
    base = tmp_path / "runs" / "base"
    cfg.write_text(
        f"finetune:\n  base: {base}\n  method: lora\ndata:\n  instructions: alpaca.json\n  template: chat\n"
    )
    info = describe(str(cfg))
    assert "model" not in info, "no model is invented while the base does not exist"
    text = format_info(info)
    assert f"fine-tune: lora (r 8, alpha 16, on c_attn, attn.c_proj) of {base}" in text
    assert "the base does not exist yet" in text and "instructions alpaca.json (template chat)" in text

    make_checkpoint(base / "checkpoints" / "step_000010.pt")  # tiny, char vocabulary of 9
    info = describe(str(cfg))
    assert info["model"]["n_embd"] == 128 and info["model"]["vocab_size"] == 9
    assert info["tokenizer"]["type"] == "char" and "does not exist" not in format_info(info)


def test_info_of_a_finetuned_run_and_its_adapter_folder(tmp_path: Path) -> None:
    from gptkit.config import LoRAConfig
    from gptkit.finetuning.lora import add_lora, save_adapter

    tok = CharTokenizer.train(["hello world"])
    overrides = ["model.preset=tiny", f"model.vocab_size={tok.vocab_size}", "finetune.base=runs/base"]
    config = load_config(None, [*overrides, "data.instructions=alpaca.json"])
    model = GPT(config.model)
    add_lora(model, LoRAConfig(r=4, targets=["c_attn"]))
    run = tmp_path / "sft"
    save_checkpoint(
        run / "checkpoints" / "step_000005.pt",
        model_state=model.state_dict(),
        config=config.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": 5, "tokens": 640},
    )
    (run / "config.yaml").write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    save_adapter(model, run / "adapter", LoRAConfig(r=4, targets=["c_attn"]), base="runs/base")

    text = format_info(describe(str(run)))
    assert "fine-tune: lora (r 8" in text and "of runs/base; instructions alpaca.json" in text
    assert f"adapter {run / 'adapter'}" in text

    info = describe(str(run / "adapter"))
    assert info["kind"] == "adapter"
    n_layers, width = 4, 128
    assert info["adapter"]["layers"] == n_layers
    assert info["adapter"]["params"] == n_layers * 4 * (width + 3 * width)
    text = format_info(info)
    assert "adapter: LORA r 4" in text and "trained on base: runs/base" in text
    assert "fine-tune: lora" in text
