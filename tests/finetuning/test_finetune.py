"""Fine-tuning: response-only loss, packing, the methods through the one trainer, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt

import gptkit
from gptkit.api import finetune
from gptkit.checkpoint import load_checkpoint, save_checkpoint
from gptkit.config import RunConfig, load_config
from gptkit.data.batch import Batch
from gptkit.errors import GptkitError
from gptkit.finetuning.instructions import Example, Report, encode, packed_batch, packed_rows, padded_batch
from gptkit.fused_loss import IGNORE_INDEX, next_token_loss
from gptkit.generate import ChatTemplate, SampleSettings
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer

QA = [
    ("What is the capital of France?", "Paris."),
    ("Name a primary colour.", "Blue."),
    ("How many legs has a spider?", "Eight."),
    ("What do bees make?", "Honey."),
]
TEMPLATE = ChatTemplate.named("chat")


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTKIT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    text = "".join(q + a for q, a in QA) + TEMPLATE.render([{"role": "user", "content": "x"}], True) + "\n"
    return CharTokenizer.train([text + "abcdefghijklmnopqrstuvwxyz"])


def messages(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def write_base(path: Path, tok: CharTokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = load_config(
        None, ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=128"]
    )
    config.model.vocab_size = tok.vocab_size
    model = GPT(config.model)
    return save_checkpoint(
        path,
        model_state=model.state_dict(),
        config=config.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": 0, "tokens": 0},
    )


def write_records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples(tok: CharTokenizer, block: int = 128) -> list[Example]:
    return encode([messages(q, a) for q, a in QA], tok, TEMPLATE, block, "truncate", Report())


def per_example_losses(model: GPT, batch: Batch) -> list[float]:
    """Mean loss of each example of a batch (packed: each segment) from the model's logits."""
    y = batch.targets
    with torch.no_grad():
        logits = model(batch.ids, layout=batch.layout())
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce.view_as(y)
    ids = batch.segments if batch.segments is not None else torch.arange(1, len(y) + 1)[:, None].expand_as(y)
    out = []
    for row in range(len(y)):
        for s in ids[row].unique().tolist():
            where = (ids[row] == s) & (y[row] != IGNORE_INDEX)
            if s and where.any():
                out.append(float(ce[row][where].mean()))
    return out


def test_loss_counts_response_tokens_only(tok: CharTokenizer) -> None:
    torch.manual_seed(0)
    model = GPT(
        load_config(
            None,
            [
                f"model.vocab_size={tok.vocab_size}",
                "model.n_layer=1",
                "model.n_embd=32",
                "model.n_head=2",
                "model.block_size=128",
            ],
        ).model
    ).eval()
    q, a = QA[0]
    ids, mask = TEMPLATE.encode(tok, messages(q, a))
    example = encode([messages(q, a)], tok, TEMPLATE, 128, "truncate", Report())[0]
    batch = padded_batch([example])
    x, y = batch.ids, batch.targets
    with torch.no_grad():
        logits, loss = model(x), next_token_loss(model, x, y)
    # by hand: the log-probability of each answer token (and the newline and end-of-text after it)
    logp = torch.log_softmax(logits[0], dim=-1)
    answer = [i for i in range(1, len(ids)) if mask[i]]
    assert tok.decode([ids[i] for i in answer if ids[i] != tok.eot_id]) == a + "\n"
    expected = -sum(float(logp[i - 1, ids[i]]) for i in answer) / len(answer)
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert int((y != IGNORE_INDEX).sum()) == len(answer)


def small_model(tok: CharTokenizer, block_size: int) -> GPT:
    """Small enough to compare examples one by one."""
    return tiny_gpt(tok.vocab_size, block_size=block_size)


def test_packing_and_padding_give_each_example_its_own_loss(tok: CharTokenizer) -> None:
    torch.manual_seed(0)
    model = small_model(tok, 128).eval()
    exs = examples(tok)
    alone = [per_example_losses(model, padded_batch([e]))[0] for e in exs]
    padded = per_example_losses(model, padded_batch(exs))
    rows = packed_rows(exs, 128)
    assert len(rows) < len(exs), "several examples share a row"
    packed = per_example_losses(model, packed_batch(rows, 128))
    assert max(abs(a - b) for a, b in zip(alone, padded, strict=True)) < 1e-5
    assert max(abs(a - b) for a, b in zip(alone, packed, strict=True)) < 1e-5


def finetune_config(tmp_path: Path, base: Path, data: Path, *more: str) -> list[str]:
    return [
        f"finetune.base={base}",
        f"data.instructions={data}",
        "data.template=chat",
        "data.val_fraction=0.25",
        f"runs_dir={tmp_path / 'runs'}",
        "train.micro_batch_size=2",
        "train.precision=fp32",
        "train.warmup_steps=5",
        "eval.batches=2",
        "eval.sample_tokens=0",
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0",
        "log.every=1",
        *more,
    ]


def records() -> list[dict]:
    return [{"instruction": q, "output": a} for q, a in QA] * 3


def test_full_finetune_answers_an_instruction(tmp_path: Path, tok: CharTokenizer) -> None:
    base = write_base(tmp_path / "base.pt", tok)
    data = write_records(tmp_path / "qa.jsonl", records())
    result = finetune(
        None,
        finetune_config(
            tmp_path,
            base,
            data,
            "name=full",
            "finetune.method=full",
            "train.max_steps=150",
            "train.lr=3e-3",
            "data.val_fraction=0.1",
        ),
    )
    # each step's loss: the mean over its answers' tokens (the prompts' are masked out), finite, falling
    losses = result.train_losses
    assert len(losses) == 150 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    payload = load_checkpoint(result.checkpoint)
    assert ChatTemplate.from_dict(payload["chat_template"]) == TEMPLATE
    model = gptkit.load(result.run_dir)
    ids, _ = TEMPLATE.encode(
        model.tokenizer, [{"role": "user", "content": QA[0][0]}], add_generation_prefix=True
    )
    out = model.sampler.generate_ids([ids], SampleSettings.of(temperature=0, max_new_tokens=20))[0]
    assert model.tokenizer.decode(out).startswith(QA[0][1])


def test_lora_and_prompt_tuning_train_only_their_parameters(tmp_path: Path, tok: CharTokenizer) -> None:
    base = write_base(tmp_path / "base.pt", tok)
    data = write_records(tmp_path / "qa.jsonl", records())
    before = load_checkpoint(base)["model"]
    lora = finetune(
        None,
        finetune_config(
            tmp_path, base, data, "name=lora", "train.max_steps=10", "finetune.lora.targets=[c_attn,c_fc]"
        ),
    )
    weights = load_checkpoint(lora.checkpoint)["model"]
    changed = {
        k
        for k, v in weights.items()
        if k.replace(".base.", ".") not in before or not torch.equal(v, before[k.replace(".base.", ".")])
    }
    assert changed and all(".lora_" in k for k in changed)
    assert (lora.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    from gptkit.finetuning.lora import lora_layers

    assert not lora_layers(gptkit.load(lora.run_dir).model), "loaded with the adapter merged"
    assert lora.tokens == 10 * 2 * 128  # packed rows: micro-batch x block_size positions per step

    prompt = finetune(
        None,
        finetune_config(
            tmp_path,
            base,
            data,
            "name=prompt",
            "train.max_steps=10",
            "finetune.method=prompt",
            "finetune.prompt_tokens=4",
            "data.packing=false",
            "train.lr=0.1",
        ),
    )
    weights = load_checkpoint(prompt.checkpoint)["model"]
    assert all(torch.equal(weights[k], v) for k, v in before.items()), "every base weight bitwise unchanged"
    assert weights["soft_prompt"].shape == (4, 64)
    # padded batches are as wide as their longest example (in 64s, at most 128 - 4): tokens and
    # tokens/s count the positions computed, not micro-batch x block_size
    assert 10 * 2 * 64 <= prompt.tokens < 10 * 2 * 128
    text = gptkit.load(prompt.run_dir).generate("User: hi", temperature=0, max_new_tokens=5)
    assert isinstance(text, str)


def test_finetune_resume_is_exact(tmp_path: Path, tok: CharTokenizer) -> None:
    base = write_base(tmp_path / "base.pt", tok)
    data = write_records(tmp_path / "qa.jsonl", records())
    common = ["train.max_steps=12", "eval.every=4", "finetune.lora.dropout=0.1"]
    whole = finetune(None, finetune_config(tmp_path, base, data, "name=whole", *common))
    finetune(None, finetune_config(tmp_path, base, data, "name=split", *common), stop_at=6)
    split = finetune(None, finetune_config(tmp_path, base, data, "name=split", *common), resume="latest")
    assert whole.train_losses[6:] == pytest.approx(split.train_losses, abs=1e-6)
    a, b = load_checkpoint(whole.checkpoint)["model"], load_checkpoint(split.checkpoint)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_bad_records_are_errors_or_counted(tmp_path: Path, tok: CharTokenizer) -> None:
    base = write_base(tmp_path / "base.pt", tok)
    rows = records() + [{"instruction": "no output here"}]
    data = write_records(tmp_path / "bad.jsonl", rows)
    with pytest.raises(GptkitError, match=r"bad.jsonl record 13: missing output .*data.skip_bad=true"):
        finetune(None, finetune_config(tmp_path, base, data, "name=bad", "train.max_steps=2"))
    result = finetune(
        None, finetune_config(tmp_path, base, data, "name=skip", "train.max_steps=2", "data.skip_bad=true")
    )
    assert result.step == 2
    # a character the base's char vocabulary never saw: the same choice, naming the record
    unknown = write_records(
        tmp_path / "unknown.jsonl", records() + [{"instruction": "Zürich?", "output": "x"}]
    )
    with pytest.raises(GptkitError, match=r"unknown.jsonl record 13: character 'Z'.*data.skip_bad=true"):
        finetune(None, finetune_config(tmp_path, base, unknown, "name=unknown", "train.max_steps=2"))
    overrides = finetune_config(
        tmp_path, base, unknown, "name=skip2", "train.max_steps=2", "data.skip_bad=true"
    )
    assert finetune(None, overrides).step == 2


def test_base_and_data_tokenizers_must_match(tmp_path: Path, tok: CharTokenizer) -> None:
    base = write_base(tmp_path / "base.pt", tok)
    gptkit.prepare([], tmp_path / "shards", tokenizer="char", progress=False, workers=1)
    overrides = finetune_config(tmp_path, base, tmp_path / "none.jsonl", "name=cpt", "train.max_steps=2")
    overrides = [o for o in overrides if not o.startswith("data.instructions")] + [
        f"data.path={tmp_path / 'shards'}"
    ]
    with pytest.raises(GptkitError, match="tokenizer"):
        finetune(None, overrides)


def test_finetune_needs_a_base(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="finetune.base is not set"):
        finetune(None, [f"runs_dir={tmp_path}"])
    assert RunConfig().finetune.base is None


def test_soft_prompt_with_padding_and_cache(tok: CharTokenizer) -> None:
    """A prompt-tuned model generates the same for a prompt alone or left-padded in a batch, and its
    cached decoding equals full forwards with the soft prompt in front."""
    from gptkit.finetuning.prompt_tuning import add_soft_prompt
    from gptkit.generate import Sampler

    torch.manual_seed(0)
    model = small_model(tok, 64).eval()
    model = add_soft_prompt(model, 5)
    with torch.no_grad():
        model.soft_prompt.mul_(5)  # a prompt strong enough to matter
    assert all(not p.requires_grad for n, p in model.named_parameters() if n != "soft_prompt")
    sampler = Sampler(model, tok)
    greedy = SampleSettings.of(temperature=0, max_new_tokens=30, stop_tokens=[])
    prompts = [tok.encode("What do bees make?"), tok.encode("Blue.")]
    alone = [sampler.generate_ids([p], greedy)[0] for p in prompts]
    assert sampler.generate_ids(prompts, greedy) == alone
    tokens = list(prompts[1])
    with torch.no_grad():
        for _ in range(30):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert tokens[len(prompts[1]) :] == alone[1]
    plain = GPT(model.config).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "soft_prompt"})
    assert Sampler(plain, tok).generate_ids([prompts[1]], greedy)[0] != alone[1], (
        "the prompt changes the output"
    )


OLD_VOCAB = "abcdefghijklmnopqrstuvwxyz .?"  # a character tokenizer of 30 ids (end-of-text included)


def old_layout_state(method: str) -> dict[str, torch.Tensor]:
    """A fine-tune's state dict with the names gptkit wrote before GPT.forward had one path, built by
    hand (2 layers, width 32, context 16, vocabulary 30 padded to 64): GPT-2's names, plus `soft_prompt`
    (4 x 32) for prompt tuning, or for LoRA (r=2 on c_attn and attn.c_proj) `base.` before those
    layers' weights and their `lora_A.default` / `lora_B.default`. Seeded random values."""
    C, shapes = 32, {"transformer.wte.weight": (64, 32), "transformer.wpe.weight": (16, 32)}
    for i in range(2):
        for name, out, inp in [("attn.c_attn", 3 * C, C), ("attn.c_proj", C, C), ("mlp.c_fc", 4 * C, C)] + [
            ("mlp.c_proj", C, 4 * C)
        ]:
            base = f"transformer.h.{i}.{name}" + (".base" if method == "lora" and "attn" in name else "")
            shapes |= {f"{base}.weight": (out, inp), f"{base}.bias": (out,)}
            if method == "lora" and "attn" in name:
                lora = f"transformer.h.{i}.{name}"
                shapes |= {f"{lora}.lora_A.default": (2, inp), f"{lora}.lora_B.default": (out, 2)}
        for ln in ("ln_1", "ln_2"):
            shapes |= {f"transformer.h.{i}.{ln}.weight": (C,), f"transformer.h.{i}.{ln}.bias": (C,)}
    shapes |= {"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    if method == "prompt":
        shapes["soft_prompt"] = (4, C)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) * 0.3 for k, shape in sorted(shapes.items())}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    return state


def write_old_layout_checkpoint(path: Path, method: str) -> Path:
    tok = CharTokenizer.train([OLD_VOCAB])
    config = load_config(
        None,
        [
            *("model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16"),
            f"model.vocab_size={tok.vocab_size}",
            *("finetune.base=base.pt", f"finetune.method={method}", "finetune.prompt_tokens=4"),
            "finetune.lora.r=2",
        ],
    )
    return save_checkpoint(
        path,
        model_state=old_layout_state(method),
        config=config.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": 5, "tokens": 80},
    )


# The logits gptkit gave for these checkpoints before the change (commit 1efa23d), for the ids of
# "what is it?": position -1's first 6 logits, and the sum of all logits.
OLD_LOGITS = {
    "prompt": ([-0.543317, -0.189235, -0.55013, -1.001112, 0.529994, -0.057282], -57.5831),
    "lora": ([0.02779, 0.102682, -0.780784, 0.721811, -0.111229, -0.162894], -66.5775),
}


@pytest.mark.parametrize("method", ["prompt", "lora"])
def test_checkpoints_written_before_the_one_forward_path_load_with_their_logits(
    tmp_path: Path, method: str
) -> None:
    from gptkit.loading import load_model

    model, tok, _ = load_model(load_checkpoint(write_old_layout_checkpoint(tmp_path / "old.pt", method)))
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("what is it?")]))
    first, total = OLD_LOGITS[method]
    assert logits[0, -1, :6].tolist() == pytest.approx(first, abs=1e-5)
    assert float(logits.sum()) == pytest.approx(total, abs=1e-3)


def test_eval_and_chat_of_a_prompt_tuned_model_leave_room_for_its_vectors(tmp_path: Path) -> None:
    """Perplexity windows and the chat context are the tokens that fit after the soft prompt (16 - 4):
    `gptkit eval` on a text longer than the context once failed with "exceeds block_size"."""
    from gptkit.generate.chat import Chat

    checkpoint = write_old_layout_checkpoint(tmp_path / "prompt.pt", "prompt")
    text = tmp_path / "text.txt"
    text.write_text("what is it? " * 20)
    done = subprocess.run(
        [sys.executable, "-m", "gptkit", "eval", str(checkpoint), "--text", str(text), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GPTKIT_NO_PROGRESS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout and "Traceback" not in done.stderr
    model = gptkit.load(checkpoint)
    assert model.model.tokens_that_fit() == 12
    assert Chat(model).context == 12


def test_sft_recipe_runs_on_real_alpaca_records(tmp_path: Path) -> None:
    """configs/sft.yaml on 60 records of the real Alpaca data, from a GPT-2-tokenizer base."""
    from conftest import ROOT, shared_file

    from gptkit.tokenizer import gpt2_tokenizer

    alpaca = json.loads(shared_file("instruct/alpaca_5000.json").read_text())[:60]
    data = write_records(tmp_path / "alpaca.jsonl", alpaca)
    base = write_base(tmp_path / "base.pt", gpt2_tokenizer())
    overrides = [f"finetune.base={base}", f"data.instructions={data}", f"runs_dir={tmp_path / 'runs'}"]
    overrides += ["train.max_steps=3", "train.micro_batch_size=2", "eval.every=0", "eval.batches=2"]
    result = finetune(ROOT / "configs" / "sft.yaml", overrides)
    assert result.step == 3 and result.best_val_loss is not None
    adapter = result.run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert ChatTemplate.from_dict(load_checkpoint(result.checkpoint)["chat_template"]).name == "alpaca"


def test_prompt_tuning_leaves_room_for_its_vectors(tmp_path: Path, tok: CharTokenizer) -> None:
    """Examples longer than the context, packing left on: the soft prompt and the tokens still fit."""
    base = write_base(tmp_path / "base.pt", tok)
    long = [{"instruction": q, "output": a * 30} for q, a in QA] * 3  # over 128 characters each
    data = write_records(tmp_path / "long.jsonl", long)
    overrides = ["name=long", "train.max_steps=3", "finetune.method=prompt", "finetune.prompt_tokens=16"]
    result = finetune(None, finetune_config(tmp_path, base, data, *overrides))
    assert result.step == 3 and result.best_val_loss is not None
    assert load_checkpoint(result.checkpoint)["config"]["data"]["packing"] is False


def test_padded_widths_come_in_few_sizes(tok: CharTokenizer) -> None:
    """Rounded up to 64 positions (at most the context): the same loss, stable shapes for the allocator."""
    exs = examples(tok)
    assert all(e.length < 64 for e in exs)
    batch = padded_batch(exs)
    x, y = batch.ids, batch.targets
    assert x.shape == (len(exs), 64) and (y[:, max(e.length for e in exs) :] == IGNORE_INDEX).all()
    longest = max(e.length for e in exs)
    assert padded_batch(exs, max_width=longest + 1).ids.shape[1] == longest + 1


@pytest.fixture(scope="module")
def full_cli_run(
    tmp_path_factory: pytest.TempPathFactory, tok: CharTokenizer
) -> tuple[Path, str, Path, Path]:
    """`gptkit finetune` of the whole model, 2 steps, through the CLI: (run folder, stderr, base, data)."""
    root = tmp_path_factory.mktemp("full-cli")
    base = write_base(root / "base.pt", tok)
    data = write_records(root / "qa.jsonl", records())
    overrides = finetune_config(
        root, base, data, "name=full-cli", "finetune.method=full", "train.max_steps=2"
    )
    config = root / "full.yaml"
    config.write_text("finetune: {method: full}\n")
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "gptkit", "finetune", str(config), *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "runs" / "full-cli", out.stderr, base, data


def test_trainable_parameters_are_counted_like_all_parameters(
    full_cli_run: tuple[Path, str, Path, Path],
) -> None:
    """A full fine-tune trains every parameter: as many trainable as in all, padding rows in neither."""
    _, stderr, base, _ = full_cli_run
    found = re.search(r"([\d,]+) trainable parameters of ([\d,]+)", stderr)
    assert found, stderr
    trainable, total = (int(g.replace(",", "")) for g in found.groups())
    assert trainable == total == gptkit.load(base).model.num_params()


def test_finetune_report_describes_what_ran(full_cli_run: tuple[Path, str, Path, Path]) -> None:
    """report.md names the method, the base and the instruction file, not the unused pre-training data."""
    run, _, base, data = full_cli_run
    report = (run / "report.md").read_text()
    rows = dict(re.findall(r"^\| (fine-tuning|data) \| (.*) \|$", report, re.MULTILINE))
    assert rows["fine-tuning"].startswith("full: every weight trains") and str(base) in rows["fine-tuning"]
    assert str(data) in rows["data"] and "template chat" in rows["data"] and "tokenizer char" in rows["data"]
    assert "data/default" not in report


def test_lora_report_names_the_adapter(tmp_path: Path) -> None:
    """A LoRA fine-tune's report gives the rank, the layers and where the adapter is."""
    from gptkit.training.report import write_report

    config = RunConfig.model_validate(
        {"finetune": {"base": "runs/base", "lora": {"r": 4, "targets": ["c_attn"]}}}
    )
    summary = {"config": config.model_dump(mode="json"), "params": 120_000, "trainable_params": 3_072}
    report = write_report(tmp_path, summary).read_text()
    assert "0.12M parameters, 3,072 of them trained |" in report
    row = re.search(r"^\| fine-tuning \| (.*) \|$", report, re.MULTILINE)
    assert row and row.group(1).startswith("LoRA (rank 4, alpha ")
    assert "on c_attn; the adapter alone in `adapter/`" in row.group(1) and "base `runs/base`" in row.group(1)


def test_no_usable_example_says_why(tmp_path: Path) -> None:
    """configs/sft.yaml on a context-128 base: Alpaca's preamble fills the context, so no response is
    left; the breakdown prints before the one-line error, which says what to change."""
    import string

    from conftest import ROOT, shared_file

    alpaca = json.loads(shared_file("instruct/alpaca_5000.json").read_text())[:20]
    data = write_records(tmp_path / "alpaca.jsonl", alpaca)
    base = write_base(tmp_path / "base.pt", CharTokenizer.train([string.printable]))
    overrides = [f"finetune.base={base}", f"data.instructions={data}", f"runs_dir={tmp_path / 'runs'}"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptkit",
            "finetune",
            str(ROOT / "configs" / "sft.yaml"),
            *overrides,
            "data.skip_bad=true",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    *_, breakdown, error = out.stderr.strip().splitlines()
    assert breakdown.startswith("gptkit: instructions: 20 records, ")
    assert "dropped because the prompt fills the context (128 tokens)" in breakdown
    assert error.startswith("gptkit: error: 0 usable example(s) in ") and "longer context" in error
    runs = tmp_path / "runs"  # at most the run's lock file (released): no run folder, nothing of a run
    assert not runs.exists() or all(p.name.startswith(".") and p.is_file() for p in runs.iterdir())


def test_changed_method_on_resume_and_empty_lora_targets_are_one_line_errors(
    tmp_path: Path, tok: CharTokenizer
) -> None:
    """Both were tracebacks: an error in backward, and a state-dict/optimizer mismatch."""
    base = write_base(tmp_path / "base.pt", tok)
    data = write_records(tmp_path / "qa.jsonl", records())
    with pytest.raises(GptkitError, match=r"lora.targets is empty, so nothing would train") as e:
        finetune(None, finetune_config(tmp_path, base, data, "name=empty", "finetune.lora.targets=[]"))
    assert "\n" not in str(e.value)
    common = finetune_config(tmp_path, base, data, "name=r", "train.max_steps=6")
    finetune(None, common, stop_at=2)
    for change, message in [
        ("finetune.lora.r=4", "finetune.lora.r 8 -> 4"),
        ("finetune.method=full", "finetune.method lora -> full"),
        ("finetune.lora.targets=[c_fc]", "finetune.lora.targets ['c_attn', 'attn.c_proj'] -> ['c_fc']"),
    ]:
        with pytest.raises(GptkitError, match=r"fine-tuning differs from checkpoint") as e:
            finetune(None, [*common, change], resume="latest")
        assert message in str(e.value)
    assert finetune(None, common, resume="latest").step == 6


def test_the_command_names_the_mode(full_cli_run: tuple[Path, str, Path, Path]) -> None:
    """`gptkit train` on a fine-tuning config used to fine-tune silently; now the command decides:
    each refuses the other's config in one line naming the right command, and a stopped fine-tune's
    resume hint names `gptkit finetune`. (Last in the file: it continues the shared run.)"""
    run, _, _, _ = full_cli_run
    env = {**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "gptkit", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    config = str(run / "config.yaml")
    wrong = cli("train", config, "--resume", "latest")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1].startswith("gptkit: error: finetune.base is set (")
    assert "fine-tune with gptkit finetune" in wrong.stderr
    no_base = cli("finetune", str(run.parent.parent / "full.yaml"), f"runs_dir={run.parent}", "name=nobase")
    assert no_base.returncode == 2 and "Traceback" not in no_base.stderr, no_base.stderr
    assert "finetune.base is not set" in no_base.stderr and "pre-train with gptkit train" in no_base.stderr
    assert not (run.parent / "nobase").exists()
    more = cli("finetune", config, "train.max_steps=4", "--resume", "latest", "--stop-at", "3")
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"resume with: gptkit finetune {config} --resume latest" in more.stderr
