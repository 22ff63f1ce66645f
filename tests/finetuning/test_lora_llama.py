"""LoRA with Llama's projection names: each of q/k/v (rows of the fused c_attn) and gate/up (rows of
c_fc) gets an adapter of its own that changes only its rows; judged by peft on the HF export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, tiny_gpt

from gptkit.config import LoRAConfig
from gptkit.errors import GptkitError
from gptkit.finetuning.lora import LLAMA_TARGETS, add_lora, load_adapter, lora_layers, merge, save_adapter
from gptkit.model import GPT

VOCAB = 101
SHAPE = {**TINY_LLAMA, "n_head": 4, "n_kv_head": 2}  # q 32 rows, k and v 16 each; gate and up 256 each
IDX = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def llama(seed: int = 0) -> GPT:
    return tiny_gpt(VOCAB, seed=seed, **SHAPE)


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


def test_llama_names_equal_peft_on_the_exported_llama(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed (dev extra)")
    transformers = pytest.importorskip("transformers")
    from gptkit.interop.hf import export_hf
    from gptkit.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.train("".join(chr(c) for c in range(32, 32 + VOCAB - 1)))
    model = llama()
    export_hf(model, tokenizer, tmp_path / "hf")
    targets = sorted(LLAMA_TARGETS)
    add_lora(model, LoRAConfig(r=2, alpha=6, targets=targets))
    randomise_b(model)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets)).eval()
    theirs = dict(wrapped.named_parameters())
    hf_name = {"attn.c_attn": "self_attn.{}_proj", "mlp.c_fc": "mlp.{}_proj"}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            i, ours = name.split(".")[2], name.split(".", 3)[3]
            for key in layer.lora_A:
                if ours in hf_name:
                    part = ["q", "k", "v"] if ours == "attn.c_attn" else ["gate", "up"]
                    starts = sorted(int(k.split(":")[1]) for k in layer.lora_A)
                    proj = hf_name[ours].format(part[starts.index(int(key.split(":")[1]))])
                else:
                    proj = {"attn.c_proj": "self_attn.o_proj", "mlp.c_proj": "mlp.down_proj"}[ours]
                prefix = f"base_model.model.model.layers.{i}.{proj}"
                theirs[f"{prefix}.lora_A.default.weight"].copy_(layer.lora_A[key])
                theirs[f"{prefix}.lora_B.default.weight"].copy_(layer.lora_B[key])
        ours_logits, theirs_logits, plain = model(IDX), wrapped(IDX).logits, llama()(IDX)
    assert float((plain - ours_logits).abs().max()) > 1e-3, "the adapter changes the logits"
    assert float((theirs_logits - ours_logits).abs().max()) < 1e-4


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
