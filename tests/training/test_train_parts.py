"""The trainer's parts on their own: schedules, optimiser groups, batches and their state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gptkit.config import ModelConfig, TrainConfig
from gptkit.data.batches import ShardBatches, fixed_batches
from gptkit.device import native_bf16, pick_precision
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.training.optim import learning_rate, make_optimizer, param_groups


def cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    return TrainConfig(**{**base, **kw})


def test_cosine_schedule_at_chosen_steps() -> None:
    c = cfg(schedule="cosine")
    assert learning_rate(0, c) == pytest.approx(1e-4)  # warm-up: (step + 1) / warmup * lr
    assert learning_rate(4, c) == pytest.approx(5e-4)
    assert learning_rate(9, c) == pytest.approx(1e-3)
    assert learning_rate(10, c) == pytest.approx(1e-3)  # cosine starts at the top
    mid = 10 + (109 - 10) / 2
    assert learning_rate(int(mid), c) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 49 / 99)))
    assert learning_rate(109, c) == pytest.approx(1e-4)  # the last step reaches min_lr
    rates = [learning_rate(s, c) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False)), "monotone after warm-up"


def test_constant_and_wsd_schedules() -> None:
    c = cfg(schedule="constant")
    assert [learning_rate(s, c) for s in (0, 9, 10, 109)] == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3])
    w = cfg(schedule="wsd", decay_fraction=0.2)  # decay over the last 22 of 110 steps
    assert learning_rate(50, w) == pytest.approx(1e-3)
    assert learning_rate(87, w) == pytest.approx(1e-3)
    assert learning_rate(88, w) == pytest.approx(1e-3 + (1e-4 - 1e-3) * 1 / 22)
    assert learning_rate(109, w) == pytest.approx(1e-4)
    assert cfg(warmup_steps=0).warmup_steps == 0 and learning_rate(0, cfg(warmup_steps=0)) == pytest.approx(
        1e-3
    )


def test_weight_decay_groups() -> None:
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    assert "transformer.h.0.attn.c_attn.weight" in decayed and "transformer.h.1.mlp.c_proj.weight" in decayed
    assert all(n.endswith(".bias") or ".ln_" in n for n in plain)
    assert "transformer.ln_f.weight" in plain and "transformer.h.0.attn.c_attn.bias" in plain
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = make_optimizer(model, cfg(), torch.device("cpu"))
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    # frozen parameters are left out (fine-tuning methods freeze the base)
    model.transformer.wte.weight.requires_grad_(False)
    assert all(p is not model.transformer.wte.weight for g in param_groups(model, 0.1) for p in g["params"])


def shards(*lengths: int) -> list[np.ndarray]:
    start = 0
    out = []
    for n in lengths:
        out.append(np.arange(start, start + n, dtype=np.uint16))
        start += n
    return out


def test_random_windows_are_targets_shifted_by_one() -> None:
    src = ShardBatches(shards(100, 50), batch_size=4, block_size=8, mode="random", seed=0)
    for _ in range(20):
        batch = src.next_batch()
        x, y = batch.ids, batch.targets
        assert batch.segments is None
        assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y - x, torch.ones_like(x)), "windows never cross a shard boundary"


def test_ordered_passes_cover_each_shard_and_reshuffle_per_epoch() -> None:
    data = shards(33, 17, 25)
    src = ShardBatches(data, batch_size=1, block_size=8, mode="ordered", seed=5)
    firsts = [int(src.next_batch().ids[0, 0]) for _ in range(12)]  # windows per epoch: 4 + 2 + 3 = 9
    epoch0 = firsts[:9]
    assert sorted(epoch0) == sorted([0, 8, 16, 24, 33, 41, 50, 58, 66])
    order0 = [v for v in epoch0 if v in (0, 33, 50)]
    orders = set()
    for seed in range(6):
        s = ShardBatches(data, batch_size=3, block_size=8, mode="ordered", seed=seed)
        orders.add(tuple(int(s.next_batch().ids[0, 0]) for _ in range(1)))
    assert len(orders) > 1, "shard order depends on the seed"
    assert order0 and src.epoch == 1


@pytest.mark.parametrize("mode", ["random", "ordered"])
def test_restored_source_continues_exactly(mode: str) -> None:
    data = shards(300, 120, 77)
    a = ShardBatches(data, batch_size=3, block_size=16, mode=mode, seed=11)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(30)]
    b = ShardBatches(data, batch_size=3, block_size=16, mode=mode, seed=11)
    b.load_state_dict(state)
    for one, two in zip(expected, (b.next_batch() for _ in range(30)), strict=True):
        assert torch.equal(one.ids, two.ids) and torch.equal(one.targets, two.targets)
    with pytest.raises(GptkitError, match=r"use the checkpoint's settings"):
        ShardBatches(data, batch_size=3, block_size=16, mode=mode, seed=12).load_state_dict(state)


def test_ranks_split_the_global_batch() -> None:
    data = shards(500)
    whole = ShardBatches(data, batch_size=4, block_size=8, seed=3)
    parts = [ShardBatches(data, batch_size=2, block_size=8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        x = whole.next_batch().ids
        assert torch.equal(torch.cat([p.next_batch().ids for p in parts]), x)


def test_fixed_val_batches_are_fixed_and_spread() -> None:
    data = shards(1000)
    a = fixed_batches(data, n_batches=3, batch_size=2, block_size=16)
    b = fixed_batches(data, n_batches=3, batch_size=2, block_size=16)
    assert all(torch.equal(one.ids, two.ids) for one, two in zip(a, b, strict=True))
    starts = [int(batch.ids[i, 0]) for batch in a for i in range(2)]
    assert starts[0] == 0 and starts[-1] == 1000 - 17 and starts == sorted(starts)


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(GptkitError, match=r"fewer than block_size \+ 1 \(65\)"):
        ShardBatches(shards(40, 30), batch_size=1, block_size=64)


def test_auto_precision_follows_device_and_model_width() -> None:
    """auto is bf16 only where the CPU multiplies bf16 natively and the model is wide enough to gain."""
    cpu = torch.device("cpu")
    narrow, wide = ModelConfig(n_layer=2, n_head=2, n_embd=64), ModelConfig(preset="small")
    native = native_bf16(cpu)
    assert pick_precision("auto", cpu, narrow) == "fp32"
    assert pick_precision("auto", cpu, wide) == ("bf16" if native else "fp32")
    assert pick_precision("fp32", cpu, wide) == "fp32"
    assert pick_precision("bf16", cpu, narrow) == "bf16"  # an explicit choice is kept
    with pytest.raises(GptkitError, match="fp16 is not supported on CPU"):
        pick_precision("fp16", cpu, wide)


def test_the_runtime_is_resolved_once_and_the_trainer_reads_it(tmp_path) -> None:
    """Device and precision were worked out by launch, the batch-size search and Trainer.__init__ in
    turn; now `resolve_runtime` answers once and the trainer takes the answer from its parts."""
    import dataclasses

    from gptkit.config import RunConfig
    from gptkit.runtime import Processes, Runtime, resolve_runtime
    from gptkit.tokenizer import CharTokenizer
    from gptkit.training.parts import Parts
    from gptkit.training.trainer import Trainer

    config = RunConfig.model_validate(
        {
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 8},
            "train": {"precision": "auto", "micro_batch_size": 2, "device": "cpu"},
        }
    )
    auto = resolve_runtime(config.train, config.model)
    assert auto == Runtime(Processes(), torch.device("cpu"), "fp32")  # auto: narrow model -> fp32
    assert auto.autocast_dtype is torch.float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        auto.precision = "bf16"  # type: ignore[misc]
    # the config's "auto" meant fp32; the runtime passed down says bf16: the trainer follows the runtime
    bf16 = Runtime(Processes(), torch.device("cpu"), "bf16")
    assert bf16.autocast_dtype is torch.bfloat16
    source = ShardBatches(shards(200), batch_size=2, block_size=16)
    parts = Parts(config, GPT(config.model), CharTokenizer.train(["abc"]), source, None, bf16)
    trainer = Trainer(parts, tmp_path / "run", "run")
    assert (trainer.device, trainer.precision, trainer.procs) == (bf16.device, "bf16", bf16.procs)
