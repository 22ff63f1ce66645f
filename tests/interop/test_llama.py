"""`LlamaForCausalLM` import and export, judged by transformers itself (random weights from a
LlamaConfig, nothing downloaded): logits, greedy generation, both config layouts, the key sets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev dependency: pip install -e .[dev]"
)
pytest.importorskip("safetensors.torch", reason="needs the export extra: pip install -e .[export]")

from conftest import tiny_gpt  # noqa: E402

from gptkit.checkpoint import load_checkpoint  # noqa: E402
from gptkit.cli import main  # noqa: E402
from gptkit.errors import GptkitError  # noqa: E402
from gptkit.generate.sampler import Sampler  # noqa: E402
from gptkit.generate.settings import SampleSettings  # noqa: E402
from gptkit.interop.hf import export_hf, load_hf, write_tokenizer  # noqa: E402
from gptkit.loading import load_model  # noqa: E402
from gptkit.tokenizer import CharTokenizer  # noqa: E402

# 69 characters + end-of-text = 70 ids: not a multiple of 64, so gptkit's embeddings have padding rows
TOKENIZER = CharTokenizer.train("".join(chr(c) for c in range(ord(" "), ord(" ") + 68)) + "\n")

# (query heads, kv heads, tied, rope_theta, linear rope factor)
SHAPES = {
    "gqa-untied": (4, 2, False, 500000.0, None),
    "mha-tied": (4, 4, True, 20000.0, None),
    "mqa-tied-linear": (4, 1, True, 1e6, 2.0),
}


def random_llama(folder: Path, heads: int, kv: int, tied: bool, theta: float, factor: float | None) -> Path:
    """A random LlamaForCausalLM saved with transformers (norm gains random too, so that a mapping
    error cannot hide behind ones), and gptkit's character tokenizer beside it."""
    rope = {"rope_type": "default", "rope_theta": theta}
    if factor is not None:
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    config = transformers.LlamaConfig(
        vocab_size=TOKENIZER.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        rope_parameters=rope,
        bos_token_id=TOKENIZER.eot_id,
        eos_token_id=TOKENIZER.eot_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    write_tokenizer(TOKENIZER, folder, 128)
    return folder


def hf_llama(folder: Path) -> torch.nn.Module:
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        folder, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


IDS = torch.tensor([TOKENIZER.encode("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG, TWICE.")])


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_import_then_export_keeps_transformers_logits(tmp_path: Path, shape: tuple) -> None:
    source = random_llama(tmp_path / "hf", *shape)
    theirs = hf_llama(source)
    assert main(["import", "hf", str(source), str(tmp_path / "m.pt")]) == 0
    model, _, config = load_model(load_checkpoint(tmp_path / "m.pt"))
    assert (config.model.kv_heads, config.model.tie_embeddings) == (shape[1], shape[2])
    with torch.no_grad():
        want = theirs(IDS).logits
        assert (model(IDS) - want).abs().max().item() < 1e-4

    assert main(["export", "hf", str(tmp_path / "m.pt"), str(tmp_path / "back")]) == 0
    back = hf_llama(tmp_path / "back")
    with torch.no_grad():
        assert (back(IDS).logits - want).abs().max().item() < 1e-4
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["rope_theta"] == exported["rope_parameters"]["rope_theta"] == shape[3]


@pytest.mark.parametrize("shape", [SHAPES["gqa-untied"], SHAPES["mqa-tied-linear"]], ids=["gqa", "linear"])
def test_greedy_generation_equals_transformers_generate(tmp_path: Path, shape: tuple) -> None:
    source = random_llama(tmp_path / "hf", *shape)
    theirs = hf_llama(source)
    model, tok, _ = load_hf(source)
    prompt = TOKENIZER.encode("ONCE UPON A TIME")
    with torch.no_grad():
        hf_out = theirs.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=50, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :]
    ours = Sampler(model, tok).generate_ids([prompt], SampleSettings(temperature=0, max_new_tokens=50))[0]
    assert len(ours) == 50
    assert ours == hf_out.tolist()


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
def test_either_config_layout_is_read(tmp_path: Path, layout: str) -> None:
    """transformers 4.x writes rope_theta / rope_scaling, 5.x rope_parameters: both import alike."""
    source = random_llama(tmp_path / "hf", *SHAPES["mqa-tied-linear"])
    want, *_ = load_hf(source)
    path = source / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("rope_theta", None), cfg.pop("rope_scaling", None)
    if layout == "4.x":
        legacy = {"type": "linear", "factor": rope["factor"]}
        cfg |= {"rope_theta": rope["rope_theta"], "rope_scaling": legacy}
    else:
        cfg |= {"rope_parameters": rope}
    path.write_text(json.dumps(cfg))
    model, _, config = load_hf(source)
    m = config.model
    assert (m.rope_theta, m.rope_scaling, m.rope_factor) == (1e6, "linear", 2.0)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), want(IDS), rtol=0, atol=0)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path: Path) -> None:
    source = random_llama(tmp_path / "hf", *SHAPES["mha-tied"])
    cfg = json.loads((source / "config.json").read_text())
    cfg |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    (source / "config.json").write_text(json.dumps(cfg))
    supported = "GPT2LMHeadModel.*LlamaForCausalLM"
    with pytest.raises(GptkitError, match=f"MistralForCausalLM.*not support.*{supported}"):
        load_hf(source)


def test_unsupported_rope_scaling_is_named(tmp_path: Path) -> None:
    source = random_llama(tmp_path / "hf", *SHAPES["mha-tied"])
    cfg = json.loads((source / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (source / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptkitError, match="'yarn' rope scaling; gptkit supports none"):
        load_hf(source)


def test_a_model_neither_gpt2_nor_llama_is_not_exported(tmp_path: Path) -> None:
    model = tiny_gpt(TOKENIZER.vocab_size, norm="rmsnorm")  # GPT-2 with RMSNorm: no HF class has it
    with pytest.raises(GptkitError, match="neither.*norm rmsnorm"):
        export_hf(model, TOKENIZER, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_refuses_a_model_neither_gpt2_nor_llama_by_name(tmp_path: Path) -> None:
    from gptkit.interop.gguf import export_gguf

    model = tiny_gpt(TOKENIZER.vocab_size, norm="rmsnorm", position="rope")  # neither GPT-2 nor Llama
    with pytest.raises(GptkitError, match="GGUF export writes GPT-2's .*norm rmsnorm"):
        export_gguf(model, TOKENIZER, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def hub_cache(cache: Path, name: str, folder: Path) -> None:
    """`folder` laid out as huggingface_hub caches a download of `name` (refs/main -> a snapshot)."""
    repo = cache / f"models--{name.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_a_hub_name_is_read_from_the_local_cache_offline(tmp_path: Path) -> None:
    """Offline (HF_HUB_OFFLINE=1), `gptkit import hf owner/name` reads huggingface_hub's cache; a
    name that is not cached is one line. Nothing is downloaded."""
    source = random_llama(tmp_path / "hf", *SHAPES["gqa-untied"])
    hub_cache(tmp_path / "cache", "someone/tiny-llama", source)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, "-m", "gptkit", "import", "hf", "someone/tiny-llama", str(tmp_path / "m.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    model, _, _ = load_model(load_checkpoint(tmp_path / "m.pt"))
    with torch.no_grad():
        assert (model(IDS) - hf_llama(source)(IDS).logits).abs().max().item() < 1e-4
    missing = subprocess.run(
        [sys.executable, "-m", "gptkit", "import", "hf", "someone/other", str(tmp_path / "x.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "nor in the HuggingFace cache" in missing.stderr
    assert not (tmp_path / "x.pt").exists()
