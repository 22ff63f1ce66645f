"""Activation checkpointing recomputes each block in the backward pass: the same losses as without
it over 10 steps (<= 1e-6, fp32, dropout on), for GPT-2 and for the Llama switches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, TINY_RUN, tiny_gpt

from gptkit.config import load_config
from gptkit.training.launch import train
from gptkit.training.recompute import recompute_blocks


@pytest.mark.parametrize("llama", [False, True], ids=["gpt2", "llama"])
def test_same_losses_over_ten_steps(tmp_path: Path, char_data: Path, llama: bool) -> None:
    switches = [f"model.{k}={v}" for k, v in TINY_LLAMA.items()] if llama else []
    common = [*TINY_RUN, *switches, f"data.path={char_data}", f"runs_dir={tmp_path}", "model.dropout=0.1"]
    common += ["train.max_steps=10", "eval.every=0", "checkpoint.every_steps=0", "eval.sample_tokens=0"]
    plain = train(load_config(None, [*common, "name=plain"]))
    recomputed = train(load_config(None, [*common, "name=ckpt", "train.activation_checkpointing=true"]))
    assert len(plain.train_losses) == 10
    assert max(abs(a - b) for a, b in zip(plain.train_losses, recomputed.train_losses, strict=True)) <= 1e-6


def test_gradients_equal_and_activations_are_not_kept() -> None:
    model, other = tiny_gpt(seed=1, dropout=0.0).train(), tiny_gpt(seed=1, dropout=0.0).train()
    recompute_blocks(other)
    ids = torch.randint(0, 101, (2, 16))
    kept = {}
    for key, m in (("plain", model), ("recomputed", other)):
        sizes: list[int] = []

        def keep(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = m(ids).logsumexp(-1).mean()
        kept[key] = sum(sizes)
        loss.backward()
    assert kept["recomputed"] < kept["plain"] / 2, kept  # what backward needs is made again there
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert set(model.state_dict()) == set(other.state_dict())  # no module renamed
