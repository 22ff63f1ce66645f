"""Fine-tuning methods side by side: full, LoRA and prompt tuning from the same base, data and steps.

    .venv/bin/python bench/finetune_compare.py [--steps 150] [--records 1000]

1. A base model (6 layers, width 256, GPT-2 tokenizer) is pre-trained for --base-steps on tiny
   Shakespeare (../shared/data), so that fine-tuning starts from something that writes English-ish.
2. Each method fine-tunes it on the first --records Alpaca records (../shared/data/instruct) for
   --steps optimiser steps with the same batch, through `gptkit finetune` in its own process (so
   peak memory is the method's own).
3. The table: trainable parameters, peak memory (RSS of the process), training tokens/s, final
   held-out loss, and greedy answers to held-out instructions.
4. Packing vs padding: the same examples through forward + backward both ways (examples/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = {
    "full": ["finetune.method=full", "train.lr=3e-4"],
    "lora": [
        "finetune.method=lora",
        "train.lr=2e-3",
        "finetune.lora.r=8",
        "finetune.lora.targets=[c_attn,attn.c_proj,c_fc,mlp.c_proj]",
    ],
    "prompt": ["finetune.method=prompt", "train.lr=3e-2", "finetune.prompt_tokens=20", "data.packing=false"],
}
QUESTIONS = 3


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, sampled every 50 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak = max(peak, p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-3000:]}")
    return time.perf_counter() - start, peak


def mean_tokens_per_sec(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [m["tokens_per_sec"] for m in lines if m["split"] == "train" and m.get("tokens_per_sec")]
    tps = tps[len(tps) // 5 :]  # without the first steps' warm-up
    return sum(tps) / len(tps)


def answers(run_dir: Path, records: list[dict], max_new: int = 40) -> list[str]:
    import gptkit
    from gptkit.finetuning.instructions import to_messages
    from gptkit.generate import ChatTemplate, SampleSettings

    model = gptkit.load(run_dir)
    template = ChatTemplate.named("alpaca")
    out = []
    for r in records:
        prompt = [m for m in to_messages(r, template) if m["role"] != "assistant"]
        ids, _ = template.encode(model.tokenizer, prompt, add_generation_prefix=True)
        new = model.sampler.generate_ids([ids], SampleSettings.of(temperature=0, max_new_tokens=max_new))[0]
        out.append(model.tokenizer.decode([i for i in new if i != model.tokenizer.eot_id]).strip())
    return out


def trainable_params(base_run: Path, method: str, settings: list[str]) -> int:
    """Parameters the method trains, counted on the module layout it builds."""
    from gptkit.checkpoint import newest_intact
    from gptkit.config import load_config
    from gptkit.finetuning.methods import apply_method
    from gptkit.loading import load_model

    model, tokenizer, _ = load_model(newest_intact(base_run)[1])
    finetune = load_config(
        None, [f"finetune.base={base_run}", *[s for s in settings if s.startswith("finetune.")]]
    )
    model = apply_method(model, finetune.finetune, tokenizer)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def packing_vs_padding(
    base_run: Path, data_file: Path, n_examples: int = 128, micro: int = 8
) -> dict[str, float]:
    """Examples per second through forward + backward, packed rows vs padded batches."""
    from gptkit.checkpoint import newest_intact
    from gptkit.finetuning.instructions import (
        Report,
        encode,
        packed_batch,
        packed_rows,
        padded_batch,
        read_records,
        to_messages,
    )
    from gptkit.fused_loss import next_token_loss
    from gptkit.generate import ChatTemplate
    from gptkit.loading import load_model

    _, payload = newest_intact(base_run)
    model, tokenizer, config = load_model(payload)
    model.train()
    template = ChatTemplate.named("alpaca")
    records = read_records(data_file, False, Report())[:n_examples]
    block = config.model.block_size
    examples = encode(
        [to_messages(r, template) for r in records], tokenizer, template, block, "truncate", Report()
    )
    results = {}
    for name in ("padding", "packing"):
        if name == "packing":
            rows = packed_rows(examples, block)
            batches = [packed_batch(rows[i : i + micro], block) for i in range(0, len(rows), micro)]
        else:
            batches = [padded_batch(examples[i : i + micro]) for i in range(0, len(examples), micro)]
        for warm in (True, False):
            start = time.perf_counter()
            for batch in batches[:2] if warm else batches:
                loss = next_token_loss(model, batch.ids, batch.targets, batch.layout())
                loss.backward()
                model.zero_grad(set_to_none=True)
            if not warm:
                results[name] = len(examples) / (time.perf_counter() - start)
    return results


def main() -> None:
    from gptkit.checkpoint import is_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--workdir", default=None, help="keep runs here (default: a temporary folder)")
    args = parser.parse_args()
    shakespeare, alpaca = SHARED / "tinyshakespeare" / "input.txt", SHARED / "instruct" / "alpaca_5000.json"
    if not shakespeare.is_file() or not alpaca.is_file():
        sys.exit(f"needs {shakespeare} and {alpaca}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gptkit-ft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1"}
    gptkit = [sys.executable, "-m", "gptkit"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )

    records = json.loads(alpaca.read_text())[: args.records + QUESTIONS]
    held_out, train_records = records[:QUESTIONS], records[QUESTIONS:]
    data = work / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    common = [f"runs_dir={work / 'runs'}", "train.precision=auto", "checkpoint.every_steps=0", "log.every=5"]
    if not is_run(work / "runs" / "base"):
        subprocess.run(
            [
                *gptkit,
                "prepare",
                str(shakespeare),
                "--out",
                str(work / "shakespeare"),
                "--tokenizer",
                "gpt2",
                "--overwrite",
                "--no-progress",
            ],
            check=True,
            env=env,
        )
        base = [
            "model.n_layer=6",
            "model.n_head=8",
            "model.n_embd=256",
            "model.block_size=256",
            f"data.path={work / 'shakespeare'}",
            f"train.max_steps={args.base_steps}",
            "train.lr=1e-3",
            "train.micro_batch_size=8",
            "train.warmup_steps=30",
            "eval.every=0",
            "eval.sample_tokens=0",
        ]
        secs, _ = run(
            [*gptkit, "train", str(ROOT / "configs" / "small.yaml"), "name=base", *common, *base], env
        )
        print(f"base: {args.base_steps} steps of pre-training in {secs:.0f} s")

    rows = []
    for method, settings in METHODS.items():
        cfg = [
            f"finetune.base={work / 'runs' / 'base'}",
            f"data.instructions={data}",
            "data.template=alpaca",
            f"train.max_steps={args.steps}",
            "train.micro_batch_size=8",
            "train.warmup_steps=15",
            "eval.every=0",
            "eval.batches=10",
            "eval.sample_tokens=0",
            f"name={method}",
            *common,
            *settings,
        ]
        if (work / "runs" / method).exists():
            subprocess.run(["rm", "-rf", str(work / "runs" / method)], check=True)
        secs, peak = run([*gptkit, "finetune", str(ROOT / "configs" / "small.yaml"), *cfg], env)
        run_dir = work / "runs" / method
        final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = [m["val_loss"] for m in final if m["split"] == "val"][-1]
        trainable = trainable_params(work / "runs" / "base", method, settings)
        rows.append(
            (method, trainable, peak, mean_tokens_per_sec(run_dir), val, secs, answers(run_dir, held_out))
        )
        print(f"  {method}: {secs:.0f} s")

    print("\n| method | trainable params | peak memory | tokens/s | held-out loss | wall |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, trainable, peak, tps, val, secs, _ in rows:
        print(
            f"| {method} | {trainable:,} | {peak / 2**20:,.0f} MiB | {tps:,.0f} | {val:.3f} | {secs:.0f} s |"
        )
    print()
    for i, r in enumerate(held_out):
        print(f"Q{i + 1}: {r['instruction']} {r.get('input', '')}".strip())
        for method, *_, said in rows:
            print(f"  {method}: {said[i][:160]!r}")
    speed = packing_vs_padding(work / "runs" / "base", data)
    ratio = speed["packing"] / speed["padding"]
    print(f"\npacking {speed['packing']:.1f} vs padding {speed['padding']:.1f} examples/s ({ratio:.2f}x)")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
