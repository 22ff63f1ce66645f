"""Quantised inference on a small GPT trained for real on tiny Shakespeare (character tokens).

The model (4 layers, width 128, 64 characters of context) trains for 400 AdamW steps of 16 windows, about 30 s
on 2 cores, once per test session. Bounds: int8 validation perplexity within 2% of fp32 and at
least 95% of the greedy tokens equal, for the forward pass and for decoding token by token; int4
(group 64) within 10% and at least 85%. Greedy tokens are compared where both models see the same
text (the held-out windows): once a free-running generation differs in one token, everything
after it differs too, so counting equal tokens there measures when the first near-tie flips, not
how often the quantised model picks another token.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_file

from gptkit.config import ModelConfig
from gptkit.fused_loss import next_token_loss
from gptkit.generate import Sampler, SampleSettings
from gptkit.generate.cpu.build import kernel
from gptkit.generate.cpu.decode import CPUDecoder
from gptkit.generate.cpu.quantize import (
    INT4_GROUP,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    quantize,
    weight_bytes,
)
from gptkit.generate.inference import fastest_decoder
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer

BLOCK = 64


@pytest.fixture(scope="module")
def trained() -> tuple[GPT, CharTokenizer, torch.Tensor]:
    """The trained fp32 model, its tokenizer and the held-out last 10% of the text as ids."""
    text = Path(shared_file("tinyshakespeare/input.txt")).read_text(encoding="utf-8")
    tokenizer = CharTokenizer.train([text])
    ids = torch.tensor(tokenizer.encode(text))
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    torch.manual_seed(0)
    config = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=BLOCK, vocab_size=tokenizer.vocab_size)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(400):
        starts = torch.randint(0, len(train) - BLOCK - 1, (16,))
        x = torch.stack([train[s : s + BLOCK] for s in starts])
        y = torch.stack([train[s + 1 : s + BLOCK + 1] for s in starts])
        loss = next_token_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, val


def windows(val: torch.Tensor, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` evenly spaced held-out windows (the same for every model) and their next characters."""
    starts = torch.linspace(0, len(val) - BLOCK - 1, n).long()
    x = torch.stack([val[s : s + BLOCK] for s in starts])
    return x, torch.stack([val[s + 1 : s + BLOCK + 1] for s in starts])


def perplexity(model: GPT, val: torch.Tensor) -> float:
    with torch.inference_mode():
        return math.exp(float(next_token_loss(model, *windows(val))))


def greedy_tokens(model: GPT, val: torch.Tensor) -> torch.Tensor:
    """The token greedy decoding picks after every prefix of the held-out windows (B, T)."""
    with torch.inference_mode():
        return model(windows(val)[0]).argmax(dim=-1)


def greedy(model: GPT, tokenizer: CharTokenizer, n: int = 50) -> list[list[int]]:
    prompts = [tokenizer.encode(p) for p in ("ROMEO:\n", "First Citizen:\nWe are", "KING HENRY")]
    settings = SampleSettings.of(max_new_tokens=n, temperature=0, stop_tokens=[])
    return Sampler(model, tokenizer, fastest_decoder).generate_ids(prompts, settings)  # as gptkit.load


@pytest.mark.parametrize(("mode", "ppl_bound", "agreement"), [("int8", 0.02, 0.95), ("int4", 0.10, 0.85)])
def test_quantized_quality(trained, mode: str, ppl_bound: float, agreement: float) -> None:
    model, tokenizer, val = trained
    q = copy.deepcopy(model)
    report = quantize(q, mode)
    base, quant = perplexity(model, val), perplexity(q, val)
    assert base < 20  # it did learn (a uniform guess over 65 characters: 65; trained here: about 13.2)
    assert abs(quant - base) / base <= ppl_bound, (mode, base, quant)
    same = float((greedy_tokens(model, val) == greedy_tokens(q, val)).float().mean())
    assert same >= agreement, (mode, same)
    # the quantised model generates through the one sampler: 50 real characters for each prompt
    out = greedy(q, tokenizer)
    assert [len(row) for row in out] == [50, 50, 50]
    assert all(0 <= t < tokenizer.vocab_size for row in out for t in row)
    assert report.layers[-2:] == ["lm_head", "transformer.wte"]
    assert len(report.layers) == 4 * model.config.n_layer + 2


@pytest.mark.skipif(kernel() is None, reason="gptkit's CPU kernels could not be built here")
def test_int8_decoding_quality(trained) -> None:
    """int8 decoding runs through gptkit's kernel (int8 weights, fp32 activations): teacher-forced on
    the held-out windows, token by token over the cache, it meets the same bounds as the forward pass."""
    model, _, val = trained
    q = copy.deepcopy(model)
    quantize(q, "int8")
    decoder = CPUDecoder.of(q)
    assert decoder is not None
    x, y = windows(val)
    cache = q.new_cache(x.size(0))
    with torch.inference_mode():
        steps = [q(x[:, :1], cache=cache)[:, -1]] + [decoder.step(cache, x[:, t]) for t in range(1, BLOCK)]
        logits, ref = torch.stack(steps, dim=1), model(x)
    base, quant = perplexity(model, val), math.exp(float(F.cross_entropy(logits.flatten(0, 1), y.flatten())))
    assert abs(quant - base) / base <= 0.02, (base, quant)
    assert float((logits.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.95


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_memory_reduced_as_reported(trained, mode: str) -> None:
    model, _, _ = trained
    q = copy.deepcopy(model)
    report = quantize(q, mode)
    assert report.bytes_before == sum(p.numel() * 4 for p in model.parameters())  # tied: wte once
    assert report.bytes_after == weight_bytes(q)
    # what is left in fp32 is small: position embeddings, LayerNorms and biases
    fp32 = sum(t.numel() * 4 for t in q.parameters()) + sum(
        m.scale.numel() * 4 for m in q.modules() if isinstance(m, Int8Embedding)
    )
    c, v, pv = model.config.n_embd, model.config.vocab_size, model.config.padded_vocab_size
    linear = model.config.n_layer * 12 * c * c + v * c  # the blocks' weights and the head
    per_weight = {"int8": 1.0, "int4": 0.5 + 4 / INT4_GROUP}[mode]  # int4: bf16 scale + zero per group
    expected = fp32 + pv * c + linear * per_weight  # + the int8 embedding table
    if mode == "int8":  # + one fp32 scale per output row (9c a block, v for the head)
        expected += 4 * (9 * c * model.config.n_layer + v)
    assert report.bytes_after == pytest.approx(expected, rel=0.001)
    assert report.bytes_after < report.bytes_before * {"int8": 0.4, "int4": 0.3}[mode]
    # the quantised layers hold no fp32 copy of their weights
    for m in q.modules():
        if isinstance(m, Int4Linear):
            assert m.codes.dtype == torch.uint8
        if isinstance(m, Int8Linear):
            assert m.qweight.dtype == torch.int8


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_each_layer_close_to_fp32(trained, mode: str) -> None:
    """Every quantised layer's output on real activations stays close to its fp32 layer's output."""
    model, _, val = trained
    q = copy.deepcopy(model)
    quantize(q, mode)
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs[name] = args[0]

        return hook

    hooks = [
        m.register_forward_hook(keep_input(name))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not model.lm_head
    ]
    with torch.inference_mode():
        model(val[None, :BLOCK])
    for h in hooks:
        h.remove()
    inputs["lm_head"] = torch.randn(8, model.config.n_embd)
    bound = {"int8": 0.03, "int4": 0.15}[mode]  # relative error of the output, by its RMS
    quantized = dict(q.named_modules())
    with torch.inference_mode():
        for name, x in inputs.items():
            ref_layer = dict(model.named_modules())[name]
            weight = ref_layer.weight[: model.config.vocab_size] if name == "lm_head" else ref_layer.weight
            bias = None if name == "lm_head" else ref_layer.bias
            ref = torch.nn.functional.linear(x, weight, bias)
            err = (quantized[name](x) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
            assert err < bound, (name, float(err))
        ids = torch.arange(model.config.vocab_size)
        emb = q.transformer.wte(ids)
        ref = model.transformer.wte.weight[ids]
        assert (emb - ref).abs().max() <= ref.abs().amax(dim=1).max() / 254 + 1e-6


def test_rejects_unknown_mode(trained) -> None:
    from gptkit.errors import GptkitError

    with pytest.raises(GptkitError, match="int8 or int4"):
        quantize(copy.deepcopy(trained[0]), "int3")  # type: ignore[arg-type]
