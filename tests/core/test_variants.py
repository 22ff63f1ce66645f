"""The model's switches (RMSNorm, SwiGLU, RoPE, GQA, bias, tied head): the config's errors, the
parameter counts against transformers' Llama, RoPE against its formula, GQA against plain
multi-head attention, and the cache against full forwards with left padding for every switch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SWITCHES, TINY_LLAMA, TINY_SHAPE, assert_cached_decoding_equals_full_forward, tiny_gpt

from gptkit.config import LLAMA_PRESETS, MODEL_PRESETS, ModelConfig, load_config
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.variants import Rotary, rotate

VOCAB = 101


def meta_model(config: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.n_head=4", "model.n_kv_head=3"], r"n_head \(4\) must be divisible by n_kv_head \(3\)"),
        (["model.position=rope", "model.n_embd=30", "model.n_head=2"], r"head_dim \(15\) must be even"),
        (
            ["model.position=rope", "model.block_size=512", "model.rope_scaling=linear"]
            + ["model.rope_factor=2", "model.rope_original_block_size=128"],
            r"block_size \(512\) is past what rope scaling covers .* = 256\); raise rope_factor",
        ),
        (["model.rope_scaling=linear", "model.rope_original_block_size=128"], "needs position=rope"),
        (["model.rope_factor=2"], "need rope_scaling=linear"),
        (["model.norm=batchnorm"], "model.norm"),
    ],
)
def test_impossible_switches_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(GptkitError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_gpt2_stays_the_default() -> None:
    c = ModelConfig(preset="gpt2", vocab_size=50257)
    assert (c.norm, c.mlp, c.position, c.kv_heads, c.bias, c.tie_embeddings) == (
        "layernorm", "gelu", "learned", 12, True, True
    )  # fmt: skip
    assert c.num_params() == meta_model(c).num_params() == 124_439_808


def test_swiglu_width_follows_llamas_rounding_rule() -> None:
    # Llama: int(2 * 4d / 3) rounded up to a multiple of 256 (d=4096 gives 11008)
    assert ModelConfig(n_embd=4096, n_head=32, mlp="swiglu").hidden == 11008
    assert ModelConfig(n_embd=128, n_head=4, mlp="swiglu").hidden == 512
    assert ModelConfig(n_embd=128, n_head=4, mlp="swiglu", mlp_hidden=300).hidden == 300
    assert ModelConfig(n_embd=128, n_head=4).hidden == 512  # gelu: 4 n_embd


@pytest.mark.parametrize("switches", list(SWITCHES.values()), ids=list(SWITCHES))
@pytest.mark.parametrize("bias", [True, False])
def test_config_count_equals_the_models(switches: dict, bias: bool) -> None:
    config = ModelConfig(**{**TINY_SHAPE, "vocab_size": VOCAB, **switches, "bias": bias})
    model = meta_model(config)
    assert model.num_params() == config.num_params()
    assert model.num_params(include_position=False) == config.num_params(include_position=False)


@pytest.mark.parametrize("preset", list(LLAMA_PRESETS))
def test_llama_presets_count_what_transformers_builds(preset: str) -> None:
    transformers = pytest.importorskip("transformers")
    from gptkit.interop.hf import llama_config

    config = ModelConfig(preset=preset, vocab_size=MODEL_PRESETS[preset].get("vocab_size", 50257))
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config(config)))
    expected = sum(p.numel() for p in theirs.parameters())  # parameters(): a tied head counted once
    assert config.num_params() == meta_model(config).num_params() == expected


def test_llama_module_names() -> None:
    model = tiny_gpt(VOCAB, **TINY_LLAMA)
    names = set(dict(model.named_parameters()))
    assert "transformer.wpe.weight" not in names and "lm_head.weight" in names  # rope; untied head
    assert not [n for n in names if n.endswith(".bias")]
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32 + 2 * 16, 32)  # 2 query heads, 1 kv
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (2 * 256, 32)  # [gate; up]
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()


# ------------------------------------------------------------------------------------------ rope


def test_rope_matches_the_direct_formula() -> None:
    """Pair (i, i + d/2) of a head at position p turns by the angle p / theta^(2i/d) (/ factor)."""
    d, theta, factor = 8, 500.0, 2.0
    config = ModelConfig(n_embd=2 * d, n_head=2, position="rope", rope_theta=theta, block_size=64)
    scaled = config.model_copy(update={"rope_scaling": "linear", "rope_factor": factor})
    x = torch.randn(1, 2, 5, d, dtype=torch.float64)
    positions = torch.tensor([0, 1, 7, 30, 63])
    for cfg, div in ((config, 1.0), (scaled, factor)):
        got = rotate(x, Rotary(cfg)(positions))
        want = torch.empty_like(x)
        for t, p in enumerate(positions.tolist()):
            for i in range(d // 2):
                a = (p / div) / theta ** (2 * i / d)
                x1, x2 = x[..., t, i], x[..., t, i + d // 2]
                want[..., t, i] = x1 * math.cos(a) - x2 * math.sin(a)
                want[..., t, i + d // 2] = x2 * math.cos(a) + x1 * math.sin(a)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rope_attention_depends_on_relative_positions_only() -> None:
    model = tiny_gpt(VOCAB, position="rope")
    ids = torch.randint(0, VOCAB, (1, 10))
    cache = model.new_cache(1)
    model(torch.zeros(1, 7, dtype=torch.long), cache=cache)
    cache.set_padding(torch.tensor([7]))  # the same tokens counted from position 0 after 7 pads
    shifted = model(ids, cache=cache)
    torch.testing.assert_close(shifted, model(ids), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- gqa


@torch.no_grad()
def test_gqa_with_as_many_kv_heads_as_heads_is_multi_head_attention() -> None:
    mha = tiny_gpt(VOCAB, seed=3, n_head=4)
    gqa = GPT(mha.config.model_copy(update={"n_kv_head": 4})).eval()
    assert gqa.load_state_dict(mha.state_dict()) is not None
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=0, rtol=0)


@torch.no_grad()
def test_gqa_equals_multi_head_attention_with_each_kv_head_repeated() -> None:
    """n_head 4, n_kv_head 2: query heads 0-1 share kv head 0, 2-3 kv head 1 (transformers' order)."""
    gqa = tiny_gpt(VOCAB, seed=4, n_head=4, n_kv_head=2, position="rope")
    mha = GPT(gqa.config.model_copy(update={"n_kv_head": None})).eval()
    state = gqa.state_dict()
    for i in range(gqa.config.n_layer):
        for suffix in ("weight", "bias"):
            name = f"transformer.h.{i}.attn.c_attn.{suffix}"
            q, k, v = state[name].split([32, 16, 16])
            grow = [t.view(2, 8, *t.shape[1:]).repeat_interleave(2, dim=0).flatten(0, 1) for t in (k, v)]
            state[name] = torch.cat([q, *grow])
    mha.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)
    assert gqa.new_cache(1).k[0].shape[1] == 2  # the cache holds the kv heads only


# ----------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("switches", list(SWITCHES.values()), ids=list(SWITCHES))
@torch.no_grad()
def test_cache_with_left_padding_equals_full_forward(switches: dict) -> None:
    """Rows of different lengths share a left-padded cache; prefill then 6 steps, each row's
    logits equal the full forward of that row alone."""
    model = tiny_gpt(VOCAB, seed=5, random_vectors=True, **switches)
    rows = [torch.randint(0, VOCAB, (n,)).tolist() for n in (9, 4, 6)]
    assert_cached_decoding_equals_full_forward(model, rows, 6)


@pytest.mark.parametrize("switches", list(SWITCHES.values()), ids=list(SWITCHES))
def test_every_switch_trains(switches: dict) -> None:
    """A few steps of AdamW on one batch lower its loss, and every parameter gets a gradient."""
    model = tiny_gpt(VOCAB, seed=6, **switches).train()
    ids = torch.randint(0, VOCAB, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
