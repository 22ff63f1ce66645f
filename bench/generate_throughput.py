"""Batch-1 greedy decoding on CPU: gptkit fp32 / int8 / int4 against HuggingFace's `generate`.

GPT-2 124M with random weights (seeded), a 32-token prompt (the first 32 GPT-2 tokens of tiny
Shakespeare, or seeded random ids without it), 256 new tokens, greedy, batch 1:

- gptkit: the real `Sampler.token_steps` (what `generate_ids`, `stream` and the server run), on the
  fp32 model as `gptkit.load` prepares it (decoding's matrix-vector products by gptkit's kernel,
  prompts by oneDNN: `gptkit.generate.cpu.linear`), with oneDNN alone, on the plain fp32 model
  (aten's `F.linear`), and on copies quantised by `gptkit.generate.cpu.quantize` ("int8", "int4");
- HuggingFace `GPT2LMHeadModel.generate(do_sample=False, use_cache=True)` with the same weights copied
  in (HF's Conv1D weights are our Linear weights transposed), in fp32, and with HF's Linear layers
  dynamic-int8 quantised by `torch.ao.quantization.quantize_dynamic` (in HF's GPT-2 only the head
  is an nn.Linear; the blocks use Conv1D and stay fp32).

Time to first token (TTFT) = prefill + choosing the first token. Decode tokens/s = the 255 tokens
after the first over their time. Variants take turns for `--rounds` rounds; each figure is the
median over rounds. The bandwidth limit: a decode step reads every weight of the blocks and of the
head once (the embedding lookups read 2 rows), so tokens/s cannot exceed copy bandwidth / those
bytes; the bandwidth is measured with a 256 MiB tensor copy (read + write bytes, best of 5).

    .venv/bin/python bench/generate_throughput.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tables import markdown  # bench/tables.py: scripts run from bench/
from torch import nn

from gptkit.generate import Sampler, SampleSettings
from gptkit.generate.cpu.build import kernel
from gptkit.generate.cpu.linear import CPULinear, use_cpu_linear
from gptkit.generate.cpu.quantize import Int4Linear, Int8Linear, quantize, weight_bytes
from gptkit.generate.inference import fastest_decoder
from gptkit.model import GPT
from gptkit.tokenizer import gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
VOCAB = 50257


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (each byte read once and written once), best of 5."""
    src = torch.ones(64 * 2**20)  # 256 MiB, far beyond the caches
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def last_level_cache() -> str:
    """The size of the CPU's last-level cache, as Linux reports it ("32768KB"), or "unknown"."""
    sizes = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    return f"{sizes[-1].read_text().strip()}B" if sizes else "unknown"


def decode_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every Linear (quantised or not) and the head."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            total += m.nbytes()
        elif isinstance(m, CPULinear):  # the head multiplies by the vocabulary's rows only
            total += m.matrix.numel() * 4 + (0 if m.bias is None else 4 * m.bias.numel())
        elif isinstance(m, nn.Linear):
            rows = VOCAB if name == "lm_head" else m.out_features  # our head reads vocab_size rows
            total += rows * m.in_features * 4 + (0 if m.bias is None else 4 * m.bias.numel())
    return total


def hf_copy(model: GPT):  # -> GPT2LMHeadModel
    """HF's GPT-2 with `model`'s weights (Conv1D = our Linear transposed; the padding rows dropped)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    config = GPT2Config(
        n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_positions=c.block_size, vocab_size=VOCAB
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    hf = GPT2LMHeadModel(config).eval()
    ours = model.state_dict()
    state = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" or name == "transformer.wte.weight":
            state[name] = ours["transformer.wte.weight"][:VOCAB]
        elif name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            state[name] = t  # HF's causal-mask buffers (older versions)
        elif name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            state[name] = ours[name].T
        else:
            state[name] = ours[name]
    hf.load_state_dict(state)
    return hf


@dataclass
class Variant:
    name: str
    run: Callable[[], tuple[float, float, list[int]]]  # -> (TTFT s, decode s, tokens)
    weight_bytes: int
    step_bytes: int
    ttft: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def gptkit_run(model: GPT, prompt: list[int], new: int) -> Callable[[], tuple[float, float, list[int]]]:
    sampler = Sampler(model, gpt2_tokenizer(), fastest_decoder)  # as gptkit.load decodes
    settings = SampleSettings.of(max_new_tokens=new, temperature=0, stop_tokens=[])

    def run() -> tuple[float, float, list[int]]:
        done = torch.zeros(1, dtype=torch.bool)
        tokens = []
        t0 = time.perf_counter()
        for step in sampler.token_steps([prompt], settings, done):
            if not tokens:
                t1 = time.perf_counter()
            tokens.append(step[0])
        return t1 - t0, time.perf_counter() - t1, tokens

    return run


def hf_run(hf, prompt: list[int], new: int) -> Callable[[], tuple[float, float, list[int]]]:
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)

    def run() -> tuple[float, float, list[int]]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            t1 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
            t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) - (t1 - t0), out[0, len(prompt) :].tolist()

    return run


def decoding_arguments(description: str) -> argparse.ArgumentParser:
    """The options every batch-1 decoding bench takes: prompt and new tokens, rounds, threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=256, help="new tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def take_turns(variants: list[Variant], rounds: int, new: int) -> None:
    """One untimed run of each variant, then `rounds` rounds in turns A, B, C, ..., recorded."""
    for v in variants:
        t0 = time.perf_counter()
        v.run()
        progress(f"warmed up {v.name} in {time.perf_counter() - t0:.1f} s")
    for r in range(rounds):
        for v in variants:
            ttft, decode, tokens = v.run()
            v.ttft.append(ttft)
            v.decode.append(decode)
            v.tokens = tokens
        progress(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{v.name} {(new - 1) / v.decode[-1]:.1f} tok/s" for v in variants)
        )


def prompt_ids(n: int) -> list[int]:
    if SHAKESPEARE.exists():
        return gpt2_tokenizer().encode(SHAKESPEARE.read_text(encoding="utf-8")[:2000])[:n]
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def main() -> None:
    parser = decoding_arguments(__doc__.split("\n")[0])
    parser.add_argument("--no-hf-int8", action="store_true", help="skip HF's dynamic int8 row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cpu = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
        f"{cpu}, load average at start {os.getloadavg()[0]:.2f}"
    )
    start = time.perf_counter()
    bandwidth = copy_bandwidth()
    torch.manual_seed(0)
    model = GPT.from_preset("gpt2", VOCAB).eval()
    prompt = prompt_ids(args.prompt)
    hf = hf_copy(model)
    fp32_step = decode_bytes(model)  # HF reads the same weights (Conv1D is no nn.Linear: counted on ours)
    head_fp32 = VOCAB * model.config.n_embd * 4
    variants = [Variant("HF fp32", hf_run(hf, prompt, args.new), weight_bytes(hf), fp32_step)]
    if not args.no_hf_int8:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(hf), {nn.Linear}, dtype=torch.qint8)
        step = fp32_step - head_fp32 + head_fp32 // 4 + 4  # the head int8 (one scale), the blocks fp32
        variants.append(Variant("HF dynamic int8 (head only)", hf_run(hf8, prompt, args.new), 0, step))
    if kernel() is None:
        progress("gptkit's CPU kernel is unavailable here: its fp32 row runs oneDNN (see the notice above)")
    fast = copy.deepcopy(model)
    use_cpu_linear(fast)
    variants.append(
        Variant("gptkit fp32", gptkit_run(fast, prompt, args.new), weight_bytes(model), fp32_step)
    )
    dnn = copy.deepcopy(model)
    use_cpu_linear(dnn, use_kernel=False)
    variants.append(
        Variant("gptkit fp32, oneDNN only", gptkit_run(dnn, prompt, args.new), weight_bytes(model), fp32_step)
    )
    variants.append(
        Variant(
            "gptkit fp32, aten F.linear", gptkit_run(model, prompt, args.new), weight_bytes(model), fp32_step
        )
    )
    reports = {}
    for mode in ("int8", "int4"):
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        reports[mode] = quantize(q, mode)
        progress(f"quantised {mode} in {time.perf_counter() - t0:.1f} s: {reports[mode]}")
        variants.append(
            Variant(f"gptkit {mode}", gptkit_run(q, prompt, args.new), weight_bytes(q), decode_bytes(q))
        )

    take_turns(variants, args.rounds, args.new)

    def tps(v: Variant) -> float:
        return (args.new - 1) / statistics.median(v.decode)

    base = tps(variants[0])
    base_ttft = statistics.median(variants[0].ttft)
    ours = next(v for v in variants if v.name == "gptkit fp32")
    header = ["run", "weights MiB", "read/token MiB", "TTFT ms", "decode tok/s", "x HF fp32", "of BW limit"]
    rows = []
    for v in variants:
        limit = bandwidth / v.step_bytes
        rows.append(
            [
                v.name,
                f"{v.weight_bytes / 2**20:.0f}" if v.weight_bytes else "-",
                f"{v.step_bytes / 2**20:.0f}",
                f"{1000 * statistics.median(v.ttft):.0f}",
                f"{tps(v):.1f}",
                f"{tps(v) / base:.2f}",
                f"{100 * tps(v) / limit:.0f}% of {limit:.0f}",
            ]
        )
    print()
    print(markdown(header, rows))
    print()
    print(
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; TTFT = prefill of {len(prompt)} tokens + the first "
        f"token (HF fp32 {1000 * base_ttft:.0f} ms); decode tok/s over the {args.new - 1} tokens after it, "
        f"median of {args.rounds} rounds."
    )
    print(
        "A fraction over 100% means the step read less than its weights from memory: the last-level "
        f"cache (here {last_level_cache()}) keeps part of them between steps, and a matrix-vector "
        "product reads faster than a copy reads + writes."
    )
    hf_tokens = variants[0].tokens
    same = ours.tokens == hf_tokens
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(ours.tokens, hf_tokens, strict=True)) if a != b), None
    )
    print(f"gptkit fp32 greedy tokens {'equal' if same else 'DIFFER from'} HF fp32's ({first_diff=})")
    for v in variants:
        if v is not ours and v.name.startswith("gptkit"):
            agree = sum(a == b for a, b in zip(v.tokens, ours.tokens, strict=True)) / len(ours.tokens)
            prefix = next(
                (i for i, (a, b) in enumerate(zip(v.tokens, ours.tokens, strict=True)) if a != b),
                len(v.tokens),
            )
            print(
                f"{v.name}: greedy tokens equal to fp32's at {agree:.0%} of positions, the first {prefix} all"
            )
    for report in reports.values():
        print(f"{report}; saved {report.saved / 2**20:.0f} MiB")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
