"""Decoding models with Llama's switches: gptkit's C kernel computes GPT-2's layers only, so
`CPUDecoder.of` declines them and they decode through GPT.forward (said once on stderr); fp32,
int8 and int4 give the tokens and logits of the model they were made from."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SWITCHES, TINY_LLAMA, tiny_gpt

from gptkit.generate.cpu.build import kernel
from gptkit.generate.cpu.decode import CPUDecoder
from gptkit.generate.decoder import ForwardDecoder
from gptkit.generate.inference import fastest_decoder, prepare
from gptkit.generate.sampler import Sampler
from gptkit.generate.settings import SampleSettings
from gptkit.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ,.\n")
VARIANTS = {k: v for k, v in SWITCHES.items() if k not in ("gpt2", "untied")}


def model_with(switches: dict, scale: float = 4.0) -> torch.nn.Module:
    """Weights x4 (peaked distributions without near-ties) for token comparisons."""
    return tiny_gpt(TOKENIZER.vocab_size, seed=2, scale=scale, **switches)


@pytest.mark.parametrize("switches", list(VARIANTS.values()), ids=list(VARIANTS))
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_variants_decode_through_forward_with_a_notice(
    switches: dict, quantize: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    model = model_with(switches)
    ready = prepare(copy.deepcopy(model), torch.device("cpu"), quantize)
    assert "decodes through PyTorch" in capsys.readouterr().err
    assert CPUDecoder.of(ready) is None
    assert isinstance(fastest_decoder(ready, 1), ForwardDecoder)
    prompt = [TOKENIZER.encode("the cat sat")]
    greedy = SampleSettings(temperature=0, max_new_tokens=20, stop_tokens=[])
    got = Sampler(ready, TOKENIZER).generate_ids(prompt, greedy)
    if quantize is None:  # fp32: exactly the plain model's tokens
        assert got == Sampler(model, TOKENIZER).generate_ids(prompt, greedy)
    plain = model_with(switches, scale=1.0)  # GPT-2's initialisation: quantisation errors as in use
    ids = torch.tensor(prompt)
    with torch.no_grad():
        want, have = plain(ids), prepare(copy.deepcopy(plain), torch.device("cpu"), quantize)(ids)
    tolerance = {None: 1e-5, "int8": 0.03, "int4": 0.2}[quantize]  # relative to the largest logit
    assert float((have - want).abs().max() / want.abs().max()) < tolerance


@pytest.mark.skipif(kernel() is None, reason="gptkit's CPU kernels could not be built here")
def test_the_kernel_still_serves_gpt2_with_an_untied_head() -> None:
    model = model_with(SWITCHES["untied"])
    ready = prepare(copy.deepcopy(model), torch.device("cpu"))
    decoder = CPUDecoder.of(ready)
    assert decoder is not None
    cache, ref = ready.new_cache(1), model.new_cache(1)
    ids = torch.tensor([TOKENIZER.encode("a dog")])
    with torch.inference_mode():
        ready(ids, cache=cache), model(ids, cache=ref)
        for token in TOKENIZER.encode("ran far"):
            step = torch.tensor([token])
            torch.testing.assert_close(decoder.step(cache, step), model(step[:, None], cache=ref)[:, -1])


def test_llama_batch_with_left_padding_equals_each_prompt_alone() -> None:
    model = model_with(TINY_LLAMA)
    sampler = Sampler(model, TOKENIZER)
    prompts = [TOKENIZER.encode(t) for t in ("a", "the big cat", "dogs run")]
    settings = SampleSettings(temperature=0, max_new_tokens=15, stop_tokens=[])
    alone = [sampler.generate_ids([p], settings)[0] for p in prompts]
    assert sampler.generate_ids(prompts, settings) == alone
