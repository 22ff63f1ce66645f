"""Prompt tuning on a Llama-style model: the soft prompt takes positions 0..P-1, so RoPE counts the
tokens after it; cached decoding equals the full forward, and training moves only the prompt."""

from __future__ import annotations

import torch
from conftest import TINY_LLAMA, assert_cached_decoding_equals_full_forward, tiny_gpt

from gptkit.finetuning.prompt_tuning import add_soft_prompt

VOCAB = 101


@torch.no_grad()
def test_cached_decoding_equals_the_full_forward_with_left_padding() -> None:
    model = add_soft_prompt(tiny_gpt(VOCAB, seed=1, **TINY_LLAMA), 5)
    model.soft_prompt.normal_()
    assert_cached_decoding_equals_full_forward(model, [[3, 9, 27, 4], [8, 1]], 4)


def test_only_the_prompt_trains_and_the_loss_falls() -> None:
    base = tiny_gpt(VOCAB, seed=2, **TINY_LLAMA)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_soft_prompt(base, 4).train()
    ids = torch.randint(0, VOCAB, (4, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["soft_prompt"]
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
