"""CPU linear layers for inference (gptkit's kernel, oneDNN): the same outputs, training untouched."""

from __future__ import annotations

import string

import pytest
import torch
from conftest import tiny_gpt

from gptkit.config import ModelConfig
from gptkit.generate import Sampler, SampleSettings
from gptkit.generate.cpu.build import kernel
from gptkit.generate.cpu.decode import CPUDecoder
from gptkit.generate.cpu.linear import CPULinear, onednn_available, use_cpu_linear
from gptkit.generate.inference import fastest_decoder
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN (mkldnn) linear op")

CHARS = " \n" + string.ascii_letters + string.digits + ".,!?;"  # 69 characters + end-of-text
CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=len(CHARS) + 1)


def pair(use_kernel: bool = True) -> tuple[GPT, GPT]:
    """The plain model (weights x4: peaked distributions, no near-ties) and a copy with the CPU layers."""
    plain = tiny_gpt(CONFIG.vocab_size, n_head=4, n_embd=64, scale=4)
    fast = GPT(CONFIG).eval()
    fast.load_state_dict(plain.state_dict())
    assert use_cpu_linear(fast, use_kernel=use_kernel) == 4 * CONFIG.n_layer + 1
    return plain, fast


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "onednn"])
def test_logits_equal_the_plain_model_to_rounding(use_kernel: bool) -> None:
    plain, fast = pair(use_kernel)
    idx = torch.randint(0, CONFIG.vocab_size, (3, 40))
    with torch.inference_mode():
        ref, out = plain(idx), fast(idx)
        assert out.shape == ref.shape
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
        one = fast(idx[:1, :1])  # a single row: the kernel's product where it is built
        assert float((one[0, 0] - ref[0, 0]).abs().max() / ref.abs().max()) < 1e-5
        last = fast(idx, last_only=True)
        assert last.shape == (3, 1, CONFIG.vocab_size)
        assert float((last[:, 0] - ref[:, -1]).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "onednn"])
def test_greedy_generation_equals_the_plain_model(use_kernel: bool) -> None:
    plain, fast = pair(use_kernel)
    tok = CharTokenizer.train([CHARS])
    settings = SampleSettings.of(temperature=0, max_new_tokens=50, stop_tokens=[])
    prompts = [tok.encode("hello"), tok.encode("a longer prompt")]
    fast_ids = Sampler(fast, tok, fastest_decoder).generate_ids(prompts, settings)  # as gptkit.load decodes
    assert fast_ids == Sampler(plain, tok).generate_ids(prompts, settings)


def test_the_head_stays_tied_and_training_uses_f_linear() -> None:
    plain, fast = pair()
    assert isinstance(fast.lm_head, CPULinear)
    assert fast.lm_head.weight.data_ptr() == fast.transformer.wte.weight.data_ptr()
    assert {k: v.shape for k, v in fast.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }  # a prepared model saves as the plain one
    layer = fast.transformer.h[0].mlp.c_fc
    x = torch.randn(5, CONFIG.n_embd, requires_grad=True)
    y = layer(x)  # gradients enabled: exactly F.linear, and differentiable
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert x.grad is not None


def test_gptkit_load_uses_cpu_linear_unless_quantised(tmp_path) -> None:
    import gptkit
    from gptkit.checkpoint import save_checkpoint
    from gptkit.config import load_config

    plain, _ = pair()
    tok = CharTokenizer.train([CHARS])
    shape = CONFIG.model_dump(include={"n_layer", "n_head", "n_embd", "block_size", "vocab_size"})
    run = load_config(None, [f"model.{k}={v}" for k, v in shape.items()])
    ckpt = save_checkpoint(
        tmp_path / "m.pt",
        model_state=plain.state_dict(),
        config=run.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": 1},
    )
    loaded = gptkit.load(ckpt, device="cpu")
    assert isinstance(loaded.model.transformer.h[0].attn.c_attn, CPULinear)
    assert (CPUDecoder.of(loaded.model) is not None) == (kernel() is not None)  # the whole-step decoder
    assert isinstance(loaded.sampler.decoder_for(loaded.model, 1), CPUDecoder) == (kernel() is not None)
    expected = Sampler(plain, tok).generate(["hello"], SampleSettings.of(temperature=0, max_new_tokens=30))[
        0
    ][0]
    assert loaded.generate("hello", temperature=0, max_new_tokens=30) == expected
    quantised = gptkit.load(ckpt, device="cpu", quantize="int8")
    assert not any(isinstance(m, CPULinear) for m in quantised.model.modules())
