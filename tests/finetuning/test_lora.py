"""LoRA: exact start, merge, what trains, stacking, saving, and peft loading our adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt

from gptkit.config import LoRAConfig, ModelConfig, TrainConfig
from gptkit.errors import GptkitError
from gptkit.finetuning.lora import (
    add_lora,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    set_adapter_weight,
)
from gptkit.model import GPT
from gptkit.training.optim import make_optimizer

CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=101)
ALL = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]


def base(seed: int = 0) -> GPT:
    return tiny_gpt(seed=seed, **CONFIG.model_dump(include={"block_size"}))


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


def randomise_b(model: GPT, name: str = "default", seed: int = 1) -> None:
    """Stand in for training: B is zero at the start, which makes every change vanish."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.1)


IDX = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(0))


def test_zero_b_gives_the_base_logits_exactly() -> None:
    model = base()
    expected = logits(model, IDX)
    add_lora(model, LoRAConfig(targets=ALL))
    assert torch.equal(logits(model, IDX), expected)


def test_only_adapter_parameters_train() -> None:
    model = base()
    wrapped = add_lora(model, LoRAConfig(r=4, targets=ALL))
    assert len(wrapped) == 4 * CONFIG.n_layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == CONFIG.n_layer * 4 * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32)


def test_biases_and_layernorms_can_train_too() -> None:
    model = base()
    add_lora(model, LoRAConfig(train_biases=True, train_layernorms=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.ln_1.weight" in trainable and "transformer.h.0.mlp.c_fc.bias" in trainable
    assert "transformer.h.0.attn.c_attn.base.bias" in trainable
    assert "transformer.h.0.attn.c_attn.base.weight" not in trainable


def test_merged_weights_give_the_adapter_logits() -> None:
    model = base()
    add_lora(model, LoRAConfig(targets=ALL))
    randomise_b(model)
    adapted = logits(model, IDX)
    assert not torch.allclose(adapted, logits(base(), IDX))
    merge(model)
    assert not lora_layers(model)
    assert set(model.state_dict()) == set(base().state_dict())
    assert float((logits(model, IDX) - adapted).abs().max()) < 1e-5


def test_stacked_adapters_add_their_changes() -> None:
    """Adapters a and b on one model change the weights by the sum of what each does alone."""
    alpha = {"a": 8.0, "b": 16.0}
    one, two, both = base(), base(), base()
    for model, names in ((one, ["a"]), (two, ["b"]), (both, ["a", "b"])):
        for name in names:
            torch.manual_seed(ord(name))  # the same A matrices for the same adapter name
            add_lora(model, LoRAConfig(targets=ALL, alpha=alpha[name]), name)
            randomise_b(model, name, seed=ord(name))
    stacked = logits(both, IDX)
    for model in (one, two, both):
        merge(model)
    assert float((logits(both, IDX) - stacked).abs().max()) < 1e-5
    w0, w1, w2 = base().state_dict(), one.state_dict(), two.state_dict()
    for key, value in both.state_dict().items():
        expected = w0[key] + (w1[key] - w0[key]) + (w2[key] - w0[key])
        assert float((value - expected).abs().max()) < 1e-6, key


def test_adapter_weights_scale_the_change() -> None:
    model = base()
    add_lora(model, LoRAConfig(targets=ALL), "a")
    randomise_b(model, "a")
    full = logits(model, IDX)
    set_adapter_weight(model, "a", 0.0)
    assert torch.equal(logits(model, IDX), logits(base(), IDX))
    set_adapter_weight(model, "a", 1.0)
    assert torch.equal(logits(model, IDX), full)


def test_save_and_load_an_adapter(tmp_path: Path) -> None:
    model = base()
    config = LoRAConfig(r=4, alpha=8, targets=["c_attn", "c_fc"])
    add_lora(model, config)
    randomise_b(model)
    expected = logits(model, IDX)
    folder = save_adapter(model, tmp_path / "adapter", config)
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 60_000, "an adapter file is small"
    fresh = base()
    load_adapter(fresh, folder)
    assert torch.equal(logits(fresh, IDX), expected)
    other = base(seed=5)
    with pytest.raises(GptkitError, match="trained on another base model"):
        load_adapter(other, folder)
    wider = GPT(CONFIG.model_copy(update={"n_embd": 64})).eval()
    (folder / "gptkit_adapter.json").unlink()  # as if saved by peft: shapes are checked
    with pytest.raises(GptkitError, match="has shape"):
        load_adapter(wider, folder)


def test_unknown_target_names_the_available_ones() -> None:
    with pytest.raises(GptkitError, match=r"LoRA target 'c_atn' matches no layer \(did you mean 'c_attn'"):
        add_lora(base(), LoRAConfig(targets=["c_atn"]))


def hf_folder_of(model: GPT, folder: Path) -> Path:
    """The base exported to a HuggingFace folder with gptkit's exporter (gpt2 tokenizer)."""
    from gptkit.interop.hf import export_hf
    from gptkit.tokenizer import gpt2_tokenizer

    return export_hf(model, gpt2_tokenizer(), folder)


GPT2_VOCAB = CONFIG.model_copy(update={"vocab_size": 50257})


def test_gptkit_adapter_loads_into_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed (dev extra)")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPT2_VOCAB).eval()
    hf_dir = hf_folder_of(model, tmp_path / "hf")
    config = LoRAConfig(r=4, alpha=8, targets=ALL)
    add_lora(model, config)
    randomise_b(model)
    adapter = save_adapter(model, tmp_path / "adapter", config)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = logits(model, idx)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        plain = hf(idx).logits
        theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()(idx).logits
    assert float((plain - ours).abs().max()) > 1e-3, "the adapter changes the logits"
    assert float((theirs - ours).abs().max()) < 1e-4


def test_peft_adapter_loads_into_gptkit(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed (dev extra)")
    transformers = pytest.importorskip("transformers")
    from gptkit.interop.hf import load_hf

    torch.manual_seed(0)
    hf_dir = hf_folder_of(GPT(GPT2_VOCAB).eval(), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    lora_config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    wrapped = peft.get_peft_model(hf, lora_config)
    with torch.no_grad():  # stand in for training: B starts at zero
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    wrapped.save_pretrained(tmp_path / "peft")
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = wrapped.eval()(idx).logits
    ours_model, _, _ = load_hf(hf_dir)
    load_adapter(ours_model, tmp_path / "peft")
    assert float((logits(ours_model, idx) - theirs).abs().max()) < 1e-4


def test_load_and_sample_stack_weighted_adapters(tmp_path: Path) -> None:
    """`gptkit.load(adapters=...)` and `gptkit sample --adapter DIR=WEIGHT` apply saved adapters."""
    import string
    import subprocess
    import sys

    import gptkit
    from gptkit.checkpoint import save_checkpoint
    from gptkit.config import load_config
    from gptkit.generate import Sampler, SampleSettings
    from gptkit.tokenizer import CharTokenizer

    tok = CharTokenizer.train([string.printable])
    assert tok.vocab_size == CONFIG.vocab_size
    shape = CONFIG.model_dump(include={"n_layer", "n_head", "n_embd", "block_size", "vocab_size"})
    run = load_config(None, [f"model.{k}={v}" for k, v in shape.items()])
    ckpt = save_checkpoint(
        tmp_path / "base.pt",
        model_state=base().state_dict(),
        config=run.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": 1},
    )
    folders, stacked = [], base()
    for name, weight in (("a", 0.5), ("b", 2.0)):
        model = base()
        torch.manual_seed(ord(name))
        add_lora(model, LoRAConfig(targets=ALL), name)
        randomise_b(model, name, seed=ord(name))
        folders.append((str(save_adapter(model, tmp_path / name, LoRAConfig(targets=ALL), name)), weight))
        torch.manual_seed(ord(name))
        add_lora(stacked, LoRAConfig(targets=ALL), name)
        randomise_b(stacked, name, seed=ord(name))
        set_adapter_weight(stacked, name, weight)
    loaded = gptkit.load(ckpt, device="cpu", adapters=folders)
    assert not lora_layers(loaded.model), "folded into the weights"
    assert float((logits(loaded.model, IDX) - logits(stacked, IDX)).abs().max()) < 1e-5
    text = loaded.generate("hello", temperature=0, max_new_tokens=12, stop_tokens=[])
    settings = SampleSettings.of(temperature=0, max_new_tokens=12, stop_tokens=[])
    reference = Sampler(stacked, tok).generate(["hello"], settings)[0][0]
    assert text == reference
    args = [sys.executable, "-m", "gptkit", "sample", str(ckpt), "--prompt", "hello", "--temperature", "0"]
    args += ["--max-new-tokens", "12"]
    for folder, weight in folders:
        args += ["--adapter", f"{folder}={weight}"]
    out = subprocess.run(args, capture_output=True, timeout=120)  # bytes: a generated "\r" stays one
    assert out.returncode == 0, out.stderr
    assert loaded.generate("hello", temperature=0, max_new_tokens=12) in out.stdout.decode()
    bad = subprocess.run([*args[:-2], "--adapter", f"{folders[0][0]}=heavy"], capture_output=True, text=True)
    assert bad.returncode == 2 and "DIR=WEIGHT" in bad.stderr and bad.stderr.count("\n") == 1
