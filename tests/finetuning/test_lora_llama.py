"""LoRA with Llama's projection names: each of q/k/v (rows of the fused c_attn) and gate/up (rows of
c_fc) gets an adapter of its own that changes only its rows; saved under HF Llama's names, judged by
peft on the HF export, both ways."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, tiny_gpt
from safetensors import safe_open

from gptkit.config import LoRAConfig
from gptkit.errors import GptkitError
from gptkit.finetuning.lora import LLAMA_TARGETS, add_lora, load_adapter, lora_layers, merge, save_adapter
from gptkit.model import GPT

VOCAB = 101
SHAPE = {**TINY_LLAMA, "n_head": 4, "n_kv_head": 2}  # q 32 rows, k and v 16 each; gate and up 256 each
IDX = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def llama(seed: int = 0, n_kv_head: int = 2) -> GPT:
    return tiny_gpt(VOCAB, seed=seed, **(SHAPE | {"n_kv_head": n_kv_head}))


def randomise_b(model: GPT, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def test_each_projection_changes_only_its_rows() -> None:
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoRAConfig(r=2, targets=["q_proj", "v_proj", "up_proj"]))
    layer = model.transformer.h[0].attn.c_attn
    assert sorted(layer.lora_B) == ["default:0:32", "default:48:64"]  # q, v: k's rows 32-48 untouched
    assert [tuple(b.shape) for b in layer.lora_B.values()] == [(32, 2), (16, 2)]
    randomise_b(model)
    with torch.no_grad():
        adapted = model(IDX)
    merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), adapted, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    attn, fc = "transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"
    changed = lambda name, a, b: bool((after[name][a:b] != before[name][a:b]).any())  # noqa: E731
    assert changed(attn, 0, 32) and not changed(attn, 32, 48) and changed(attn, 48, 64)
    assert not changed(fc, 0, 256) and changed(fc, 256, 512)  # gate untouched, up changed


def exported(model: GPT, folder: Path) -> Path:
    """The base as the `LlamaForCausalLM` folder `gptkit export hf` writes."""
    from gptkit.interop.hf import export_hf
    from gptkit.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.train("".join(chr(c) for c in range(32, 32 + VOCAB - 1)))
    return export_hf(model, tokenizer, folder)


FUSED = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]  # whole layers: q/k/v and gate/up share A


@pytest.mark.parametrize("targets", [sorted(LLAMA_TARGETS), FUSED], ids=["projections", "fused"])
@pytest.mark.parametrize("n_kv_head", [2, 4], ids=["gqa", "mha"])
def test_llama_adapter_loads_into_peft(tmp_path: Path, n_kv_head: int, targets: list[str]) -> None:
    """The saved folder, as written, is a peft adapter of HF's Llama: every key loads, none is left
    over, and peft's logits are ours."""
    peft = pytest.importorskip("peft", reason="peft is not installed (dev extra)")
    transformers = pytest.importorskip("transformers")
    model = llama(n_kv_head=n_kv_head)
    hf_dir = exported(model, tmp_path / "hf")
    config = LoRAConfig(r=2, alpha=6, targets=targets)
    add_lora(model, config)
    randomise_b(model)
    adapter = save_adapter(model, tmp_path / "adapter", config)
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_config["fan_in_fan_out"] is False
    assert sorted(peft_config["target_modules"]) == sorted(LLAMA_TARGETS)
    keys = safe_open(str(adapter / "adapter_model.safetensors"), "pt").keys()
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" in keys
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys")
        wrapped = peft.PeftModel.from_pretrained(hf, adapter).eval()
    check = wrapped.load_adapter(adapter, adapter_name="check")
    assert check.missing_keys == [] and check.unexpected_keys == []
    with torch.no_grad():
        ours, theirs, plain = model(IDX), wrapped(IDX).logits, llama(n_kv_head=n_kv_head)(IDX)
    assert float((plain - ours).abs().max()) > 1e-3, "the adapter changes the logits"
    assert float((theirs - ours).abs().max()) < 1e-4
    fresh = llama(n_kv_head=n_kv_head)
    load_adapter(fresh, adapter)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), ours, atol=1e-6, rtol=1e-6)


def test_peft_llama_adapter_loads_into_gptkit(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed (dev extra)")
    transformers = pytest.importorskip("transformers")
    hf_dir = exported(llama(), tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    with torch.no_grad():  # stand in for training: B starts at zero
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    wrapped.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = wrapped.eval()(IDX).logits
    model = llama()
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        assert float((model(IDX) - theirs).abs().max()) < 1e-4


def test_an_adapter_peft_cannot_express_keeps_gptkit_names(tmp_path: Path) -> None:
    """c_attn and q_proj under one adapter name both change q's rows: two adapters on one peft module."""
    model = llama()
    config = LoRAConfig(r=2, targets=["c_attn", "q_proj"])
    add_lora(model, config)
    randomise_b(model)
    adapter = save_adapter(model, tmp_path / "adapter", config)
    keys = safe_open(str(adapter / "adapter_model.safetensors"), "pt").keys()
    assert "base_model.model.transformer.h.0.attn.c_attn:0:32.lora_A.weight" in keys
    fresh = llama()
    load_adapter(fresh, adapter)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), model(IDX), atol=1e-6, rtol=1e-6)


def test_a_projection_adapter_saves_and_loads(tmp_path: Path) -> None:
    model = llama()
    config = LoRAConfig(r=2, targets=["k_proj", "gate_proj", "o_proj"])
    add_lora(model, config)
    randomise_b(model)
    with torch.no_grad():
        want = model(IDX)
    save_adapter(model, tmp_path / "adapter", config)
    fresh = llama()
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), want, atol=1e-6, rtol=1e-6)


def test_gate_and_up_need_swiglu() -> None:
    with pytest.raises(GptkitError, match="gate_proj and up_proj need a SwiGLU MLP"):
        add_lora(tiny_gpt(VOCAB), LoRAConfig(targets=["gate_proj"]))
