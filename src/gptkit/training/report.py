"""The run's report card, report.md: what was trained, how it went, and how to go on."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gptkit.config import RunConfig
from gptkit.files import write_atomic
from gptkit.finetuning.lora import ADAPTER_DIR
from gptkit.layout import CHECKPOINT_FOLDER, CONFIG_FILE, LOSS_PNG, METRICS_FILE, REPORT_FILE, SAMPLES_FILE
from gptkit.tracking import markdown_code
from gptkit.training.runlog import (
    format_samples,
    read_metrics,
    sample_sections,
    si,
)


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write `run_dir/report.md` atomically and return its path.

    `summary` should hold:
      run_name        str (default: the folder's name)
      status          "finished", or how it ended, e.g. "stopped early (emergency checkpoint)"
      config          dict from RunConfig.model_dump(mode="json")
    and may hold (None counts as absent):
      resume_command  str, shown when status is not "finished"
      stop_reason     str, why the run stopped
      params          int, parameter count
      trainable_params  int, those that trained (fine-tuning: fewer)
      tokenizer       str, e.g. "gpt2"
      device, precision, micro_batch_size, grad_accum, tokens_per_step
                      the resolved values, shown instead of the config's "auto" or None
      steps, tokens   int, optimiser steps done and tokens seen
      wall_seconds    float
      tokens_per_sec  float, the mean
      mfu             float, a fraction (0.041 = 4.1%)
      best_val_loss, best_val_step, final_train_loss
      samples         {prompt: text}, the latest samples (used when samples.md has none)
      data_shares     {share/SOURCE: fraction}, a streamed mixture's token share per source
    Numbers left out are taken from metrics.jsonl where it has them (best val loss and its step,
    final train loss, tokens, mean MFU); anything still unknown shows as "—".
    """
    run_dir = Path(run_dir)
    s = {k: v for k, v in summary.items() if v is not None}
    s = {**_from_metrics(run_dir / METRICS_FILE, s), **s}
    config = _full_config(s.get("config"))
    parts = [
        f"# {s.get('run_name') or run_dir.name}\n\n",
        _status(s),
        "## Results\n\n",
        _table("result", _results(s, config)),
        _shares(s.get("data_shares") or {}, config),
        "## Configuration\n\n",
        _table("setting", _configuration(s, config)),
    ]
    files = [
        f"`{f}`"
        for f in (CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, f"{CHECKPOINT_FOLDER}/")
        if (run_dir / f).exists()
    ]
    if files:
        parts.append(f"Files in this folder: {', '.join(files)}.\n\n")
    if (run_dir / LOSS_PNG).is_file():
        parts.append(f"## Loss curve\n\n![loss curve]({LOSS_PNG})\n\n")
    parts.append(_samples(run_dir, s))
    path = run_dir / REPORT_FILE
    write_atomic(path, "".join(parts).rstrip("\n") + "\n")
    return path


def _shares(shares: dict[str, float], config: dict[str, Any]) -> str:
    """The streamed mixture: each source's share of the tokens next to its weight."""
    if not shares:
        return ""
    sources = (config.get("data") or {}).get("sources") or []
    weights = {src["path"]: src["weight"] for src in sources}
    total = sum(weights.values()) or 1.0
    rows = []
    for key, share in shares.items():
        name = key.removeprefix("share/")
        weight = f"{weights[name] / total:.1%}" if name in weights else "—"
        rows.append(f"| `{name}` | {weight} | {share:.1%} |\n")
    return "## Data mixture\n\n| source | weight | token share |\n|---|---|---|\n" + "".join(rows) + "\n"


def _full_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """A partial config dict gets its defaults filled in, so every line of the summary can be written."""
    if not config:
        return {}
    try:
        return RunConfig.model_validate(config).model_dump(mode="json")
    except ValidationError:
        return {}


def _from_metrics(path: Path, s: dict[str, Any]) -> dict[str, Any]:
    """What metrics.jsonl can tell: best val loss and its step, the last train loss, tokens, mean MFU."""
    records = read_metrics(path)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val" and _number(r.get("val_loss"))]
    out: dict[str, Any] = {}
    if val:
        if "best_val_loss" in s:  # given: find the step it was reached at
            best = min(val, key=lambda r: abs(r["val_loss"] - s["best_val_loss"]))
        else:
            best = min(val, key=lambda r: r["val_loss"])
            out["best_val_loss"] = best["val_loss"]
        out["best_val_step"] = best["step"]
    losses = [r for r in train if _number(r.get("loss"))]
    if losses:
        out["final_train_loss"] = losses[-1]["loss"]
    tokens = [r["tokens"] for r in train if _number(r.get("tokens"))]
    if tokens:
        out["tokens"] = tokens[-1]
    mfu = [r["mfu"] for r in train if _number(r.get("mfu"))]
    if mfu:
        out["mfu"] = sum(mfu) / len(mfu)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _status(s: dict[str, Any]) -> str:
    status = s.get("status", "finished")
    text = f"**Status:** {status}"
    if s.get("stop_reason"):
        text += f": {s['stop_reason']}"
    text += "\n\n"
    if status != "finished" and s.get("resume_command"):
        text += f"Resume with:\n\n```sh\n{s['resume_command']}\n```\n\n"
    return text


def _table(header: str, rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header} | |", "| --- | --- |"]
    lines += [f"| {key} | {value.replace('|', chr(92) + '|')} |" for key, value in rows]
    return "\n".join(lines) + "\n\n"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, m, sec = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s" if m else f"{sec}s"


def _loss(value: float) -> str:
    return f"{value:.4f} (perplexity {math.exp(min(value, 50.0)):.2f})"


def _results(s: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, str]]:
    dash = "—"
    max_steps = config.get("train", {}).get("max_steps")
    steps = s.get("steps")
    if "tokens_per_sec" not in s and s.get("tokens") and s.get("wall_seconds"):
        s = {**s, "tokens_per_sec": s["tokens"] / s["wall_seconds"]}
    best = s.get("best_val_loss")
    at = f" at step {s['best_val_step']:,}" if "best_val_step" in s else ""
    return [
        ("steps", dash if steps is None else f"{steps:,}" + (f" of {max_steps:,}" if max_steps else "")),
        ("tokens seen", f"{s['tokens']:,} ({si(s['tokens'])})" if "tokens" in s else dash),
        ("wall time", _duration(s["wall_seconds"]) if "wall_seconds" in s else dash),
        ("mean throughput", f"{si(s['tokens_per_sec'])} tokens/s" if "tokens_per_sec" in s else dash),
        ("MFU", f"{100 * s['mfu']:.1f}%" if "mfu" in s else dash),
        ("best val loss", _loss(best) + at if best is not None else dash),
        ("final train loss", _loss(s["final_train_loss"]) if "final_train_loss" in s else dash),
    ]


def _configuration(s: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, str]]:
    model, data, train = config.get("model", {}), config.get("data", {}), config.get("train", {})
    rows = []
    if model:
        shape = (
            f"{model.get('n_layer')} layers, {model.get('n_head')} heads, {model.get('n_embd')} wide, "
            f"context {model.get('block_size')}, vocab {model.get('vocab_size') or '—'}"
        )
        if model.get("dropout"):
            shape += f", dropout {model['dropout']:g}"
        if "params" in s:
            shape += f"; {s['params'] / 1e6:.2f}M parameters"
            if s.get("trainable_params", s["params"]) != s["params"]:
                shape += f", {s['trainable_params']:,} of them trained"
        rows.append(("model", shape))
    finetune = config.get("finetune", {})
    if finetune.get("base"):
        rows.append(("fine-tuning", _finetuning(finetune)))
    if data.get("instructions") and finetune.get("base"):
        rows.append(("data", _instructions(data, s)))
    elif data.get("stream"):
        n = len(data.get("sources") or []) or 1
        how = f"{data.get('pack')} packing, shuffle buffer {data.get('shuffle_buffer')}"
        rows.append(("data", f"streamed from {n} source(s), {how}; tokenizer {s.get('tokenizer', '—')}"))
    elif data or "tokenizer" in s:
        where = markdown_code(str(data.get("path", "—")), block=False)
        rows.append(
            ("data", f"{where}, {data.get('sampling', '?')} sampling; tokenizer {s.get('tokenizer', '—')}")
        )
    if train:
        clip = f"grad clip {train['grad_clip']:g}" if train.get("grad_clip") else "no grad clipping"
        rows.append(
            (
                "optimiser",
                f"AdamW, lr {train.get('lr', 0):.1e} to {train.get('min_lr', 0):.1e}, "
                f"betas ({train.get('beta1')}, {train.get('beta2')}), "
                f"weight decay {train.get('weight_decay', 0):g}, {clip}",
            )
        )
        schedule = f"{train.get('schedule')}, {train.get('warmup_steps')} warm-up steps"
        if train.get("schedule") == "wsd":
            schedule += f", last {100 * train.get('decay_fraction', 0):g}% of steps decaying"
        rows.append(("schedule", f"{schedule}, {train.get('max_steps'):,} steps"))
        micro = s.get("micro_batch_size", train.get("micro_batch_size"))
        batch = f"micro-batch {micro}"
        if "grad_accum" in s:
            batch += f" x {s['grad_accum']} accumulation steps"
        per_step = s.get("tokens_per_step", train.get("tokens_per_step"))
        if per_step is None and isinstance(micro, int) and "grad_accum" not in s and model.get("block_size"):
            per_step = micro * model["block_size"]  # no accumulation unless tokens_per_step asks for it
        if per_step:
            batch += f", {per_step:,} tokens per step"
        rows.append(("batch", batch))
        precision, device = s.get("precision", train.get("precision")), s.get("device", train.get("device"))
        compiled = ", compiled" if train.get("compile") else ""
        rows.append(("precision, device", f"{precision} on {device}{compiled}; seed {train.get('seed')}"))
    return rows


def _finetuning(finetune: dict[str, Any]) -> str:
    """The method, its settings and the base: what this fine-tune trained, from what."""
    method = finetune.get("method")
    base = markdown_code(str(finetune["base"]), block=False)
    if method == "lora":
        lora = finetune.get("lora", {})
        extras = [
            n for n, on in (("biases", "train_biases"), ("LayerNorms", "train_layernorms")) if lora.get(on)
        ]
        text = (
            f"LoRA (rank {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout', 0):g}) on "
            f"{', '.join(lora.get('targets', []))}{''.join(f', {e}' for e in extras)}; the adapter alone "
            f"in `{ADAPTER_DIR}/` (peft layout)"
        )
    elif method == "prompt":
        init = finetune.get("prompt_init")
        text = f"prompt tuning: {finetune.get('prompt_tokens')} virtual tokens" + (
            f", started from the embeddings of {markdown_code(init, block=False)}" if init else ""
        )
    else:
        text = "full: every weight trains"
    return f"{text}; base {base}"


def _instructions(data: dict[str, Any], s: dict[str, Any]) -> str:
    """Instruction data: the file, its held-out part, the template and how examples fill rows."""
    held_out = (
        f"held out: {markdown_code(data['val_instructions'], block=False)}"
        if data.get("val_instructions")
        else f"{100 * data.get('val_fraction', 0):g}% held out"
    )
    rows = "packed several to a row" if data.get("packing") else "padded one to a row"
    return (
        f"instructions {markdown_code(str(data['instructions']), block=False)}, {held_out}; "
        f"template {data.get('template')}, examples {rows}, too long ones {data.get('too_long')}d; "
        f"tokenizer {s.get('tokenizer', '—')} (the base's)"
    )


def _samples(run_dir: Path, s: dict[str, Any]) -> str:
    """The latest samples: the last section of samples.md (it knows their step), else the summary's."""
    path = run_dir / SAMPLES_FILE
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    sections = [(step, body) for step, body in sample_sections(text) if step is not None]
    if sections:
        step, section = sections[-1]
        title = f"## Samples at step {step:,}"
    elif s.get("samples"):
        section, title = format_samples(0, s["samples"]), "## Latest samples"
    else:
        return ""
    body = section.split("\n", 1)[1].lstrip("\n")  # without its `## step N` heading
    return f"{title}\n\n{body}"
