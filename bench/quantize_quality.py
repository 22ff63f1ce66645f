"""Quality of int8 and int4 (at several group sizes) on a model trained for real: the README's figures.

The model and data are those of tests/test_quantize.py: 4 layers, width 128, 64 characters of
context, trained for 400 AdamW steps on the first 90% of tiny Shakespeare (about 30 s on 2 cores).
On 64 evenly spaced held-out windows of the last 10%, for each mode:

- validation perplexity through `GPT.forward`, and how far it is from fp32's;
- greedy next-token agreement with fp32: after every prefix of the windows, the share of positions
  where the quantised model's top token is fp32's (both see the same text; see the test's docstring);
- the same two decoding token by token through gptkit's CPU kernel (teacher-forced over the cache),
  which is how `gptkit sample` and `gptkit chat` run a quantised model;
- the weights' size.

    .venv/bin/python bench/quantize_quality.py
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tables import markdown  # bench/tables.py: scripts run from bench/

from gptkit.config import ModelConfig
from gptkit.fused_loss import next_token_loss
from gptkit.generate.cpu.decode import CPUDecoder
from gptkit.generate.cpu.quantize import quantize, weight_bytes
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BLOCK = 64


def train() -> tuple[GPT, torch.Tensor]:
    """The test's model, trained as the test trains it, and the held-out ids."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.train([text])
    ids = torch.tensor(tokenizer.encode(text))
    split = int(0.9 * len(ids))
    data, val = ids[:split], ids[split:]
    torch.manual_seed(0)
    config = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=BLOCK, vocab_size=tokenizer.vocab_size)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(400):
        starts = torch.randint(0, len(data) - BLOCK - 1, (32,))
        x = torch.stack([data[s : s + BLOCK] for s in starts])
        y = torch.stack([data[s + 1 : s + BLOCK + 1] for s in starts])
        loss = next_token_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), val


def windows(val: torch.Tensor, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.linspace(0, len(val) - BLOCK - 1, n).long()
    x = torch.stack([val[s : s + BLOCK] for s in starts])
    return x, torch.stack([val[s + 1 : s + BLOCK + 1] for s in starts])


@torch.inference_mode()
def forward_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@torch.inference_mode()
def decoded_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """Teacher-forced decoding: the first token through GPT.forward, then one kernel step per token
    (all windows in each step: the kernel computes each row as it would alone)."""
    decoder = CPUDecoder.of(model)
    if decoder is None:
        raise SystemExit("gptkit's CPU kernel is not available here: no decoding figures")
    cache = model.new_cache(x.size(0))
    steps = [model(x[:, :1], cache=cache)[:, -1]]
    steps += [decoder.step(cache, x[:, t]) for t in range(1, x.size(1))]
    return torch.stack(steps, dim=1)


def figures(logits: torch.Tensor, y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(perplexity, share of positions whose top token is the reference's)."""
    ppl = math.exp(float(F.cross_entropy(logits.flatten(0, 1), y.flatten())))
    return ppl, float((logits.argmax(-1) == ref.argmax(-1)).float().mean())


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, val = train()
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    x, y = windows(val)
    ref = forward_logits(model, x)
    base, _ = figures(ref, y, ref)
    header = ["mode", "weights MiB", "ppl", "vs fp32", "greedy = fp32"]
    header += ["decoded ppl", "vs fp32", "greedy = fp32"]
    rows = [["fp32", f"{weight_bytes(model) / 2**20:.2f}", f"{base:.3f}", "", "", "", "", ""]]
    for mode, group in [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]:
        q = copy.deepcopy(model)
        quantize(q, mode, group=group or 64)
        ppl, same = figures(forward_logits(q, x), y, ref)
        dppl, dsame = figures(decoded_logits(q, x), y, ref)
        rows.append(
            [
                f"{mode}, group {group}" if group else mode,
                f"{weight_bytes(q) / 2**20:.2f}",
                f"{ppl:.3f}",
                f"{(ppl - base) / base:+.2%}",
                f"{same:.1%}",
                f"{dppl:.3f}",
                f"{(dppl - base) / base:+.2%}",
                f"{dsame:.1%}",
            ]
        )
    print(markdown(header, rows))


if __name__ == "__main__":
    main()
