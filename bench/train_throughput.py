"""Training tokens/s and MFU on CPU: gptkit's training step against HuggingFace's GPT2LMHeadModel.

For each configuration this script builds

- gptkit's GPT, trained by the real `Trainer.train_step()` (a Trainer over an in-memory token
  source, its RunConfig from `load_config(None, overrides)`): forward under the trainer's autocast,
  backward, `clip_grad_norm_`, fused AdamW with GPT-2's weight-decay groups, zero_grad; run inside
  `gptkit.device.fast_matmul(device)`, as `Trainer.run` runs its loop;
- HuggingFace `transformers`' `GPT2LMHeadModel` with the same shapes (`GPT2Config(n_embd, n_layer,
  n_head, n_positions=T, vocab_size, *_pdrop=0)`, HF's default attention, which is "sdpa": the same
  `F.scaled_dot_product_attention` as ours), trained by a step that copies the trainer's: the same
  optimiser built by the same `make_optimizer`, the same learning-rate schedule, clipping and
  precision, the loss on the same targets (`labels=y, shift_labels=y`, so HF does not shift). HF
  runs with glibc's default allocator, as an HF or nanoGPT-style script gets; one reference row
  gives HF our allocator setting (`reuse_freed_memory`) too;

all fed the same batches of real text (tiny Shakespeare, ../shared/data beside the project root,
GPT-2 tokens, or character ids for the "char" configurations whose model vocabulary is 104 like
the quick start's; random windows from a seeded generator).

Timing: after `--warmup` untimed steps each, the variants take turns in `--rounds` rounds; in each
round a variant runs one untimed step and then `--steps` timed full training steps (wall time of
`train_step()`, which ends with `float(loss)`); tokens/s is batch x T over the median step time.
Taking turns spreads a shared machine's load over all variants alike; the load average is printed.
gpt2 (124M) takes 1 warm-up step and 2 rounds of 1 + 2 steps. MFU = flops_per_token
(gptkit.training.budget: 6N + 12 L C T) x tokens/s / the measured matmul ceiling
(`budget.matmul_ceiling`) of the precision the run multiplies in. "x HF fp32" is tokens/s over
HF fp32's tokens/s of the same configuration.

With `--curve`, gptkit's default precision ("auto", as `pick_precision` resolves it for the model)
and fp32 are each trained for `--curve-steps` steps (default 300; warm-up 10%, cosine schedule)
from the same seed on the same batches of each `--curve-configs` configuration; the losses are
smoothed by a trailing 20-step mean, and the maximum relative difference of the smoothed curves
and the relative difference of the final smoothed loss are printed. `--curve-losses FILE` keeps
finished runs' losses, so that a long comparison survives an interruption.

    .venv/bin/python bench/train_throughput.py             # small and gpt2 (124M): about 7 minutes
    .venv/bin/python bench/train_throughput.py --configs none --curve --curve-losses curves.json
        # the 300-step curves of the small configuration: about 25 minutes
    .venv/bin/python bench/train_throughput.py --configs w32,w64,tiny,w256,w256-T128,small --precision-only

`--precision-only` times gptkit fp32 against bf16 only, the data behind precision "auto" on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tables import markdown  # bench/tables.py: scripts run from bench/

from gptkit.config import RunConfig, load_config
from gptkit.data.batch import Batch
from gptkit.device import autocast, fast_matmul, pick_precision
from gptkit.model import GPT
from gptkit.runtime import resolve_runtime
from gptkit.tokenizer import CharTokenizer, gpt2_tokenizer
from gptkit.training.budget import flops_per_token, matmul_ceiling
from gptkit.training.optim import learning_rate, make_optimizer, set_learning_rate
from gptkit.training.parts import Parts
from gptkit.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SMOOTH = 20  # loss curves: trailing mean over this many steps

# name: model shape, micro-batch, vocabulary ("gpt2": GPT-2's 50257 tokens; "char": 104 ids, the
# quick start's character vocabulary)
CONFIGS: dict[str, dict[str, Any]] = {
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=8, vocab="gpt2"),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=1, vocab="gpt2"),
    # for precision "auto" on CPU: widths 32 (the tests' size) to 256
    "w32": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch=4, vocab="char"),
    "w64": dict(n_layer=4, n_head=2, n_embd=64, block_size=128, batch=32, vocab="char"),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch=32, vocab="char"),
    "tiny-gpt2vocab": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch=32, vocab="gpt2"),
    "w256": dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch=16, vocab="char"),
    "w256-T128": dict(n_layer=4, n_head=8, n_embd=256, block_size=128, batch=32, vocab="char"),
}
CHAR_VOCAB = 104


# ---------------------------------------------------------------------------------------------
# Data


class ListSource:
    """The trainer's TokenSource over a fixed list of batches, cycled."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.i = batches, 0

    def next_batch(self) -> Batch:
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]


@functools.cache
def corpus_tokens(vocab: str) -> np.ndarray:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    if vocab == "gpt2":
        return np.array(gpt2_tokenizer().encode(text), dtype=np.int64)
    return np.array(CharTokenizer.train([text]).encode(text), dtype=np.int64)


def make_batches(vocab: str, batch: int, block: int, n: int, seed: int = 0) -> list[Batch]:
    tokens = corpus_tokens(vocab)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(tokens) - block - 1, size=batch)
        rows = torch.from_numpy(np.stack([tokens[s : s + block + 1] for s in starts]))
        out.append(Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    return out


# ---------------------------------------------------------------------------------------------
# Runs


def run_config(
    shape: dict[str, Any], precision: str, run_dir: Path, max_steps: int, *extra: str
) -> RunConfig:
    vocab = 50257 if shape["vocab"] == "gpt2" else CHAR_VOCAB
    return load_config(
        None,
        [
            f"model.n_layer={shape['n_layer']}",
            f"model.n_head={shape['n_head']}",
            f"model.n_embd={shape['n_embd']}",
            f"model.block_size={shape['block_size']}",
            f"model.vocab_size={vocab}",
            "model.dropout=0.0",
            f"train.micro_batch_size={shape['batch']}",
            f"train.precision={precision}",
            "train.device=cpu",
            f"train.max_steps={max_steps}",
            f"train.warmup_steps={max(1, max_steps // 10)}",
            f"runs_dir={run_dir}",
            *extra,
        ],
    )


def ours(cfg: RunConfig, batches: list[Batch], run_dir: Path, seed: int = 0) -> Trainer:
    """A Trainer whose train_step() we time."""
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    runtime = resolve_runtime(cfg.train, cfg.model)
    parts = Parts(cfg, model, None, ListSource(batches), None, runtime)  # type: ignore[arg-type]
    trainer = Trainer(parts, run_dir, "bench")
    return trainer


class HFTrainer:
    """HF's GPT2LMHeadModel trained by a copy of Trainer.train_step (accumulation 1)."""

    def __init__(self, cfg: RunConfig, batches: list[Batch], precision: str, seed: int = 0) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        m = cfg.model
        hf_config = GPT2Config(
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_positions=m.block_size,
            vocab_size=m.vocab_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,  # GPT-2's 50256 is outside a character vocabulary
            eos_token_id=None,
            loss_type="ForCausalLM",
        )
        torch.manual_seed(seed)
        self.model = GPT2LMHeadModel(hf_config).train()
        self.attention = self.model.config._attn_implementation
        self.config, self.precision, self.device = cfg, precision, torch.device("cpu")
        self.optimizer = make_optimizer(self.model, cfg.train, self.device)
        self.source, self.step = ListSource(batches), 0

    def train_step(self) -> tuple[float, float, float]:
        tc = self.config.train
        lr = learning_rate(self.step, tc)
        set_learning_rate(self.optimizer, lr)
        batch = self.source.next_batch()
        x, y = batch.ids, batch.targets
        with autocast(self.device, self.precision):
            loss = self.model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss.detach()), grad_norm, lr


@dataclass
class Variant:
    name: str
    precision: str  # the precision the run multiplies in (for its MFU ceiling)
    step: Callable[[], tuple[float, float, float]]
    context: Callable[[], Any]  # entered around each block of steps
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    note: str = ""


def time_variants(variants: list[Variant], warmup: int, rounds: int, steps: int) -> None:
    for v in variants:
        with v.context():
            for _ in range(warmup):
                v.losses.append(v.step()[0])
        progress(f"  warmed up {v.name}")
    for r in range(rounds):
        for v in variants:
            with v.context():
                v.losses.append(v.step()[0])  # the block's untimed step (the allocator refills)
                for _ in range(steps):
                    t0 = time.perf_counter()
                    v.losses.append(v.step()[0])
                    v.times.append(time.perf_counter() - t0)
        progress(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{v.name} {statistics.median(v.times):.2f}s" for v in variants)
        )


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Tables


def throughput(name: str, args: argparse.Namespace, tmp: Path) -> list[Variant]:
    """Build the configuration's variants and time them; returns them with their step times."""
    shape = CONFIGS[name]
    slow = shape["n_embd"] >= 768  # gpt2 124M: a few steps only
    warmup, rounds, steps = (1, 2, 2) if slow else (args.warmup, args.rounds, args.steps)
    n_batches = warmup + rounds * (steps + 1) + 1
    batches = make_batches(shape["vocab"], shape["batch"], shape["block_size"], n_batches)
    device = torch.device("cpu")
    progress(f"{name}: building models")

    def cfg(precision: str) -> RunConfig:
        return run_config(shape, precision, tmp / name, 1000)

    keep = functools.partial(fast_matmul, device)  # what Trainer.run wraps its loop in
    plain = contextlib.nullcontext  # HF: glibc's default allocator
    variants = []
    for precision in ("fp32", "bf16") if args.precision_only or slow else ("fp32", "bf16", "auto"):
        t = ours(cfg(precision), batches, tmp / name)
        label = f"gptkit {precision}" + (f" (= {t.precision})" if precision == "auto" else "")
        variants.append(Variant(label, t.precision, t.train_step, keep))
    if args.precision_only:
        time_variants(variants, warmup, rounds, steps)
        return variants
    for precision in ("fp32", "bf16"):
        hf = HFTrainer(cfg(precision), batches, precision)
        variants.append(Variant(f"HF {precision}", precision, hf.train_step, plain, note=hf.attention))
    if not slow:
        hf = HFTrainer(cfg("fp32"), batches, "fp32")
        variants.append(Variant("HF fp32, freed memory kept", "fp32", hf.train_step, keep, note=hf.attention))
    time_variants(variants, warmup, rounds, steps)
    return variants


def tokens_per_sec(name: str, v: Variant, best: bool = False) -> float:
    shape = CONFIGS[name]
    return shape["batch"] * shape["block_size"] / (min(v.times) if best else statistics.median(v.times))


def throughput_rows(name: str, variants: list[Variant]) -> list[list[str]]:
    model_cfg = run_config(CONFIGS[name], "fp32", Path("."), 1000).model
    fpt = flops_per_token(model_cfg, _num_params(model_cfg))
    base = tokens_per_sec(name, next(v for v in variants if v.name == "HF fp32"))
    rows = []
    for v in variants:
        tps = tokens_per_sec(name, v)
        mfu = fpt * tps / matmul_ceiling("cpu", v.precision)
        rows.append(
            [
                name,
                v.name + (f" ({v.note} attention)" if v.note else ""),
                f"{statistics.median(v.times) * 1000:,.0f}",
                f"{tps:,.0f}",
                f"{tokens_per_sec(name, v, best=True):,.0f}",
                f"{100 * mfu:.1f}%",
                f"{tps / base:.2f}",
            ]
        )
    return rows


def precision_row(name: str, variants: list[Variant]) -> list[str]:
    shape = CONFIGS[name]
    fp32, bf16 = (tokens_per_sec(name, v) for v in variants)
    model_cfg = run_config(shape, "auto", Path("."), 1000).model
    auto = pick_precision("auto", torch.device("cpu"), model_cfg)
    return [
        name,
        f"{shape['n_layer']}x{shape['n_embd']}, {shape['n_head']} heads, T={shape['block_size']}, "
        f"B={shape['batch']}, vocab {model_cfg.vocab_size}",
        f"{fp32:,.0f}",
        f"{bf16:,.0f}",
        f"{bf16 / fp32:.2f}",
        auto,
    ]


def _num_params(model_cfg: Any) -> int:
    with torch.device("meta"):
        return GPT(model_cfg).num_params()


# ---------------------------------------------------------------------------------------------
# Loss curves


def smooth(losses: list[float], window: int = SMOOTH) -> np.ndarray:
    c = np.cumsum(np.insert(np.asarray(losses, dtype=np.float64), 0, 0.0))
    return (c[window:] - c[:-window]) / window


def curve(name: str, n: int, tmp: Path, saved: Path | None) -> str:
    """`saved`: a JSON file of finished runs' losses, reused when present (a long comparison can be
    split over several invocations) and written after each run."""
    shape = CONFIGS[name]
    batches = make_batches(shape["vocab"], shape["batch"], shape["block_size"], n, seed=1)
    runs = json.loads(saved.read_text()) if saved is not None and saved.exists() else {}
    # "auto" as pick_precision resolves it for this model (what the trainer picks once it passes the model)
    auto = pick_precision("auto", torch.device("cpu"), run_config(shape, "auto", tmp, n).model)
    out = {}
    for precision in ("auto", "fp32"):
        resolved = auto if precision == "auto" else precision
        key = f"{name}/{resolved}/{n}"
        if key in runs:
            out[precision] = (resolved, runs[key]["losses"], runs[key]["seconds"])
            progress(f"  curve {precision} ({resolved}): {n} steps read from {saved}")
            continue
        cfg = run_config(shape, resolved, tmp / f"curve-{precision}", n)
        t = ours(cfg, batches, tmp / f"curve-{precision}", seed=1337)
        start = time.perf_counter()
        losses = []
        with fast_matmul(t.device):
            for i in range(n):
                losses.append(t.train_step()[0])
                if (i + 1) % 25 == 0:
                    progress(f"  curve {precision} ({t.precision}): step {i + 1}/{n}, loss {losses[-1]:.3f}")
        out[precision] = (t.precision, losses, time.perf_counter() - start)
        if saved is not None:
            runs[key] = {"losses": losses, "seconds": out[precision][2]}
            saved.write_text(json.dumps(runs))
    (p_auto, a, ta), (_, b, tb) = out["auto"], out["fp32"]
    sa, sb = smooth(a), smooth(b)
    rel = np.abs(sa - sb) / sb
    lines = [
        f"loss curves, {name} config, {n} steps (warm-up {max(1, n // 10)}, cosine), same seed and batches:",
        f"  auto (= {p_auto}): {ta:.0f} s, loss {a[0]:.3f} -> {a[-1]:.3f}; "
        f"fp32: {tb:.0f} s, loss {b[0]:.3f} -> {b[-1]:.3f}",
        f"  smoothed (trailing {SMOOTH}-step mean, steps {SMOOTH}..{n}): max relative difference "
        f"{100 * rel.max():.3f}% (at step {int(rel.argmax()) + SMOOTH}), final {100 * rel[-1]:.3f}% "
        f"({sa[-1]:.4f} vs {sb[-1]:.4f}); raw final-step difference {100 * abs(a[-1] - b[-1]) / b[-1]:.3f}%",
        f"  mean relative difference over the smoothed curve {100 * rel.mean():.3f}%",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="small,gpt2", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision-only", action="store_true", help="gptkit fp32 vs bf16 only")
    parser.add_argument("--curve", action="store_true", help="also the loss-curve comparison")
    parser.add_argument("--curve-steps", type=int, default=300)
    parser.add_argument("--curve-configs", default="small", help="configs of the loss-curve comparison")
    parser.add_argument("--curve-losses", type=Path, help="JSON file keeping finished curve runs (reused)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c and c != "none"]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")

    import transformers

    cpu = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
        f"{cpu}, load average at start {os.getloadavg()[0]:.2f}"
    )
    start = time.perf_counter()
    ceilings = {p: matmul_ceiling("cpu", p) / 1e9 for p in ("fp32", "bf16")}  # measured once, first
    with tempfile.TemporaryDirectory(prefix="gptkit-train-bench-") as tmp:
        results = {name: throughput(name, args, Path(tmp)) for name in configs}
        if results and args.precision_only:
            header = ["config", "shape", "fp32 tok/s", "bf16 tok/s", "bf16 / fp32", "auto picks"]
            print()
            print(markdown(header, [precision_row(n, vs) for n, vs in results.items()]))
        elif results:
            header = ["config", "run", "step ms", "tokens/s", "best tok/s", "MFU", "x HF fp32"]
            rows = [row for n, vs in results.items() for row in throughput_rows(n, vs)]
            print()
            print(markdown(header, rows))
            print()
            print(
                f"MFU against the measured matmul ceiling of the run's precision (budget.matmul_ceiling): "
                f"fp32 {ceilings['fp32']:.0f}, bf16 {ceilings['bf16']:.0f} GFLOP/s. tokens/s from the "
                "median step; best tok/s from the fastest."
            )
        for name in args.curve_configs.split(",") if args.curve else []:
            print()
            print(curve(name, args.curve_steps, Path(tmp), args.curve_losses))
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
