"""Tests of the GPT-2 model: shapes, loss, parameter counts, initialisation, tying and the KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SHAPE, tiny_gpt

from gptkit import fused_loss
from gptkit.config import GPT2_PRESETS, ModelConfig
from gptkit.errors import GptkitError
from gptkit.model import GPT, KVCache, attention_layout

VOCAB = 101  # deliberately not a multiple of 64, so the embedding table has padding rows


def tiny_config(**overrides: object) -> ModelConfig:
    return ModelConfig(**{**TINY_SHAPE, "vocab_size": VOCAB, **overrides})


def tiny_model(seed: int = 0, **overrides: object) -> GPT:
    return tiny_gpt(int(overrides.pop("vocab_size", VOCAB)), seed=seed, **overrides).train()


def meta_model(config: ModelConfig) -> GPT:
    """A model without storage: building even gpt2-xl costs nothing."""
    with torch.device("meta"):
        return GPT(config)


def expected_params(n_layer: int, n_embd: int, block_size: int, vocab_size: int, bias: bool = True) -> int:
    """Parameter count of GPT-2 from its shapes (tied lm_head counted once, no padding rows)."""
    C = n_embd
    b = 1 if bias else 0
    per_block = (
        2 * (C + b * C)  # ln_1, ln_2
        + (C * 3 * C + b * 3 * C)  # attn.c_attn
        + (C * C + b * C)  # attn.c_proj
        + (C * 4 * C + b * 4 * C)  # mlp.c_fc
        + (4 * C * C + b * C)  # mlp.c_proj
    )
    return vocab_size * C + block_size * C + n_layer * per_block + (C + b * C)


# ---------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize(
    ("preset", "count"),
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_gpt2_parameter_counts_match_huggingface(preset: str, count: int) -> None:
    model = meta_model(ModelConfig(preset=preset, vocab_size=50257))
    assert model.config.padded_vocab_size == 50304  # padding present, yet not counted
    assert model.num_params() == count


@pytest.mark.parametrize("preset", list(GPT2_PRESETS))
@pytest.mark.parametrize("bias", [True, False])
def test_every_preset_matches_formula(preset: str, bias: bool) -> None:
    config = ModelConfig(preset=preset, vocab_size=50257, bias=bias)
    expected = expected_params(config.n_layer, config.n_embd, config.block_size, 50257, bias)
    model = meta_model(config)
    assert model.num_params() == expected
    assert model.num_params(include_position=False) == expected - config.block_size * config.n_embd


def test_padding_does_not_change_count() -> None:
    counts = {
        m: meta_model(ModelConfig(preset="tiny", vocab_size=50257, pad_vocab_multiple=m)) for m in (1, 64)
    }
    assert counts[1].transformer.wte.num_embeddings == 50257
    assert counts[64].transformer.wte.num_embeddings == 50304
    assert counts[1].num_params() == counts[64].num_params()
    assert counts[1].num_params(False) == counts[64].num_params(False)


def test_module_names_follow_huggingface() -> None:
    names = set(dict(tiny_model().named_parameters()))
    for suffix in (
        "ln_1.weight",
        "ln_1.bias",
        "attn.c_attn.weight",
        "attn.c_attn.bias",
        "attn.c_proj.weight",
        "attn.c_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ):
        assert f"transformer.h.1.{suffix}" in names
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        assert name in names
    # the tied head appears in the state dict (as in HF) but is not a separate parameter
    assert "lm_head.weight" in tiny_model().state_dict()


# ---------------------------------------------------------------------------------------------
# Forward, loss


def test_output_shapes() -> None:
    model = tiny_model()
    assert model.config.padded_vocab_size == 128
    idx = torch.randint(0, VOCAB, (3, 7))
    assert model(idx).shape == (3, 7, VOCAB)  # not padded
    assert model(idx, head=False).shape == (3, 7, 32)  # the final hidden states
    assert model(idx, last_only=True).shape == (3, 1, VOCAB)


def test_inputs_embeds_give_the_logits_of_their_ids() -> None:
    model = tiny_model().eval()
    idx = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(model(inputs_embeds=model.transformer.wte(idx)), model(idx), rtol=0, atol=0)


def test_loss_is_cross_entropy_of_the_logits() -> None:
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (2, 9))
    targets = torch.randint(0, VOCAB, (2, 9))
    logits, loss = model(idx), fused_loss.next_token_loss(model, idx, targets)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - math.log(VOCAB)) < 0.5  # a fresh model is close to uniform


def test_loss_ignores_minus_100_targets() -> None:
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (2, 9))
    targets = torch.randint(0, VOCAB, (2, 9))
    targets[0, :4] = -100
    targets[1, 7:] = -100
    logits, loss = model(idx), fused_loss.next_token_loss(model, idx, targets)
    keep = targets != -100
    log_probs = logits.log_softmax(dim=-1)
    by_hand = -log_probs[keep].gather(1, targets[keep].unsqueeze(1)).mean()
    torch.testing.assert_close(loss, by_hand)


def test_padded_ids_get_no_probability_and_no_gradient() -> None:
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (2, 5))
    fused_loss.next_token_loss(model, idx, idx).backward()
    wte = model.transformer.wte.weight
    assert torch.count_nonzero(wte[VOCAB:]) == 0  # initialised to zero
    assert wte.grad is not None
    assert torch.count_nonzero(wte.grad[VOCAB:]) == 0  # and nothing pushes them away from zero


def test_sequence_longer_than_block_size_raises() -> None:
    model = tiny_model()
    with pytest.raises(GptkitError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    model(torch.zeros(1, 64, dtype=torch.long))  # exactly block_size is fine


def test_vocab_size_none_raises() -> None:
    with pytest.raises(GptkitError, match="vocab_size"):
        GPT(ModelConfig(preset="tiny"))


def test_from_preset() -> None:
    with torch.device("meta"):
        model = GPT.from_preset("gpt2", 50257, dropout=0.1)
    assert (model.config.n_layer, model.config.dropout, model.config.vocab_size) == (12, 0.1, 50257)
    with pytest.raises(GptkitError, match="preset"):
        GPT.from_preset("gpt3", 50257)


# ---------------------------------------------------------------------------------------------
# Weights: tying, initialisation, bias flag, dropout


def test_weights_are_tied_and_stay_tied_after_a_step() -> None:
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, VOCAB, (2, 8))
    before = model.transformer.wte.weight.detach().clone()
    fused_loss.next_token_loss(model, idx, idx).backward()
    optimizer.step()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert not torch.equal(before, model.transformer.wte.weight)  # the step did change the shared tensor


def test_initialisation_statistics() -> None:
    n_layer = 8
    model = tiny_model(n_layer=n_layer, n_head=4, n_embd=256, vocab_size=1000)
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias") and "ln_" not in name:
            assert torch.count_nonzero(p) == 0, name
    wte = model.transformer.wte.weight
    assert wte[:1000].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(wte[1000:]) == 0
    for block in model.transformer.h:
        assert torch.equal(block.ln_1.weight, torch.ones(256))
        assert torch.count_nonzero(block.ln_1.bias) == 0
        assert block.ln_1.eps == 1e-5


def test_bias_false_has_no_bias_parameters() -> None:
    model = tiny_model(bias=False)
    assert not [name for name, _ in model.named_parameters() if "bias" in name]
    logits = model(torch.randint(0, VOCAB, (1, 4)))
    assert logits.shape == (1, 4, VOCAB)


def test_dropout_random_in_train_and_deterministic_in_eval() -> None:
    model = tiny_model(dropout=0.3)
    idx = torch.randint(0, VOCAB, (2, 10))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


# ---------------------------------------------------------------------------------------------
# KV cache


@torch.no_grad()
def test_cache_one_token_at_a_time_matches_full_forward() -> None:
    model = tiny_model().eval()
    seq = torch.randint(0, VOCAB, (2, 4))
    cache = model.new_cache(batch_size=2)
    logits = model(seq, cache=cache)  # prefill into the empty cache
    torch.testing.assert_close(logits, model(seq), rtol=0, atol=1e-5)
    for _ in range(50):
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # greedy
        seq = torch.cat([seq, next_id], dim=1)
        logits = model(next_id, cache=cache)
        full = model(seq)
        assert (logits[:, -1] - full[:, -1]).abs().max().item() < 1e-5
    assert cache.pos == seq.size(1) == 54


@torch.no_grad()
def test_cache_in_chunks_matches_full_forward() -> None:
    model = tiny_model().eval()
    seq = torch.randint(0, VOCAB, (2, 5 + 3 * 8))
    full = model(seq)
    cache = model.new_cache(batch_size=2)
    start, chunks = 0, [5] + [3] * 8
    for size in chunks:
        logits = model(seq[:, start : start + size], cache=cache)
        assert (logits - full[:, start : start + size]).abs().max().item() < 1e-5
        start += size
    assert cache.pos == seq.size(1)


def test_cache_shapes_and_reset() -> None:
    model = tiny_model()
    cache = model.new_cache(batch_size=3, max_len=16)
    assert isinstance(cache, KVCache)
    assert len(cache.k) == len(cache.v) == 2
    assert cache.k[0].shape == (3, 2, 16, 16)  # (B, n_head, max_len, head_dim)
    assert cache.k[0].dtype == model.dtype and cache.k[0].device == model.device
    assert model.new_cache(1).max_len == 64  # block_size by default
    with torch.no_grad():
        model(torch.zeros(3, 5, dtype=torch.long), cache=cache)
    assert cache.pos == 5
    cache.reset()
    assert cache.pos == 0


@torch.no_grad()
def test_cache_beyond_block_size_or_max_len_raises() -> None:
    model = tiny_model().eval()
    cache = model.new_cache(batch_size=1)
    model(torch.zeros(1, 62, dtype=torch.long), cache=cache)
    with pytest.raises(GptkitError, match="block_size"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert cache.pos == 62  # a refused call leaves the cache as it was
    small = model.new_cache(batch_size=1, max_len=4)
    with pytest.raises(GptkitError, match="max_len"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=small)
    with pytest.raises(GptkitError, match="batch_size"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=small)
    with pytest.raises(GptkitError, match="block_size"):
        model.new_cache(batch_size=1, max_len=65)


@pytest.mark.parametrize("chunk_elements", [2**27, 101 * 7])
def test_fused_loss_matches_logits_loss_and_gradients(
    monkeypatch: pytest.MonkeyPatch, chunk_elements: int
) -> None:
    """The fused loss (the trainer's path) gives the same loss and gradients as the plain path,
    whether the logits fit one chunk or are cut into many (7 rows per chunk, the last one short)."""
    monkeypatch.setattr(fused_loss, "LOSS_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=101)
    idx = torch.randint(0, 101, (3, 16))
    targets = torch.randint(0, 101, (3, 16))
    targets[0, :5] = -100
    model = GPT(config)
    plain = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = fused_loss.next_token_loss(model, idx, targets)
    fused.backward()
    assert float(fused) == pytest.approx(float(plain), abs=1e-5)
    for name, p in model.named_parameters():
        assert float((p.grad - expected[name]).abs().max()) < 1e-5, name


@torch.no_grad()
def test_packed_layout_gives_each_example_the_logits_it_has_alone() -> None:
    """One helper makes masks and positions: packed examples neither see each other nor count positions
    from the row's start, so their logits are those of each example run alone."""
    model = tiny_model().eval()
    a, b = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 7))
    row = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1] * 5 + [2] * 7 + [0] * 2])
    layout = attention_layout(row.size(1), row.device, segments=segments)
    assert layout.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1]]
    packed = model(row, layout=layout)
    torch.testing.assert_close(packed[:, :5], model(a), rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[:, 5:12], model(b), rtol=0, atol=1e-5)
    with pytest.raises(GptkitError, match="KV cache"):
        attention_layout(14, row.device, model.new_cache(1), segments)
