"""Evaluation: batched scores vs one at a time, each task's log-likelihoods vs a direct computation,
lm-evaluation-harness on the same examples, perplexity windows, results files, bad input."""

from __future__ import annotations

import bz2
import copy
import functools
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli import gptkit_cli as run_gptkit
from conftest import SHARED_DATA, shared_file, tiny_gpt

from gptkit.checkpoint import save_checkpoint
from gptkit.config import EvalConfig, RunConfig, load_config
from gptkit.errors import GptkitError
from gptkit.eval.perplexity import perplexity, read_tokens, windows
from gptkit.eval.run import EvalSettings, Evaluator, read_results
from gptkit.eval.scoring import encode_pair, logits_fn, score_requests
from gptkit.eval.tasks import KNOWN_TASKS, Example, find_task_file, hellaswag_example, load_task
from gptkit.layout import EVAL_FILE, EVAL_PNG
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer, gpt2_tokenizer

BLOCK = 64  # shorter than many contexts: truncation is exercised too


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTKIT_NO_PROGRESS", "1")


def tiny_model(seed: int = 0) -> GPT:
    """The GPT-2 vocabulary, weights x8: peaked, varied distributions, no near-ties."""
    return tiny_gpt(50257, block_size=BLOCK, seed=seed, scale=8)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


def direct_logprob(model: GPT, tok: Tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The straightforward computation: one full forward, sum of log-probs of the continuation tokens."""
    whole = tok.encode(context + continuation)
    n_cont = len(whole) - len(tok.encode(context))
    ids = whole[-(BLOCK + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    logprobs = F.log_softmax(logits.double(), dim=-1)
    total, greedy = 0.0, True
    for j in range(len(ids) - n_cont, len(ids)):
        total += float(logprobs[j - 1, ids[j]])
        greedy &= int(logprobs[j - 1].argmax()) == ids[j]
    return total, greedy


WIKIHOW_CTX = (
    "[header] How to clean a ceiling fan [title] Turn the fan off. [step] Make sure the blades stop."
)
# A few records in the original hellaswag_val.jsonl layout: WikiHow markers, a ctx_b to capitalise.
HELLASWAG_RECORDS = [
    {
        "ind": 4,
        "activity_label": "Home and Garden",
        "ctx_a": WIKIHOW_CTX,
        "ctx_b": "",
        "ctx": WIKIHOW_CTX,
        "split": "val",
        "split_type": "indomain",
        "label": 2,
        "endings": [
            "[substeps] Pour water on the motor.",
            "Paint the blades green [title] Wait a week.",
            "Wipe each blade with a damp cloth. [substeps] Start from the centre.",
            "Sell the house.",
        ],
        "source_id": "wikihow~1",
    },
    {
        "ind": 7,
        "activity_label": "Shaving",
        "ctx_a": "A man stands in front of a mirror.",
        "ctx_b": "the MAN",
        "ctx": "A man stands in front of a mirror. the MAN",
        "split": "val",
        "split_type": "zeroshot",
        "label": 0,
        "endings": ["spreads foam on his face.", "jumps into a pool.", "drives a car.", "eats the mirror."],
        "source_id": "activitynet~v_1",
    },
]


@functools.cache
def hellaswag_lines() -> list[str]:
    with bz2.open(shared_file("hellaswag/hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(6 * 40)]


def hellaswag_jsonl(path: Path, n_from_shared: int) -> Path:
    """The records above, then the first examples of the shared 6-line copy rewritten in jsonl."""
    records = list(HELLASWAG_RECORDS)
    text = hellaswag_lines()
    for i in range(n_from_shared):
        ctx, label, *endings = text[6 * i : 6 * i + 6]
        activity, _, rest = ctx.partition(": ")
        records.append(
            dict(HELLASWAG_RECORDS[1], ind=100 + i, activity_label=activity, ctx_a=rest, ctx_b="", ctx=rest)
            | {"label": int(label), "endings": endings}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def task_files(tmp: Path, n: int) -> dict[str, Path]:
    """The original release layouts, with the first `n` examples of the shared copies."""
    lambada = tmp / "lambada_test.jsonl"
    lambada.write_text(
        "\n".join(shared_file("lambada/lambada_test.jsonl").read_text().splitlines()[:n]) + "\n"
    )
    piqa = tmp / "valid.jsonl"
    piqa.write_text("\n".join(shared_file("piqa/valid.jsonl").read_text().splitlines()[:n]) + "\n")
    labels = shared_file("piqa/valid-labels.lst").read_text().splitlines()[:n]
    (tmp / "valid-labels.lst").write_text("\n".join(labels) + "\n")
    return {
        "hellaswag": hellaswag_jsonl(tmp / "hellaswag_val.jsonl", n - 2),
        "lambada": lambada,
        "piqa": piqa,
    }


# -- scoring -----------------------------------------------------------------------------------


def test_batched_scores_equal_one_at_a_time_whatever_the_padding(model: GPT, tok: Tokenizer) -> None:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while"]
    words += ["seven", "cats", "watch"]
    requests = [(" ".join(words[: 1 + i % 12]) * (1 + i // 4), " " + words[(i * 5) % 12]) for i in range(14)]
    requests.append(("x " * 80 + "y", " long continuation past nothing"))  # truncated on the left
    # float64: a batch's matmuls round differently from a single row's by about 1e-6 of these large
    # log-probabilities in fp32; in float64 any difference left would be padding leaking into scores.
    forward = logits_fn(copy.deepcopy(model).double())
    alone = score_requests(forward, tok, requests, BLOCK, batch_size=1)
    for batch_size in (3, 16):
        for order in (list(range(len(requests))), list(reversed(range(len(requests))))):
            batched = score_requests(forward, tok, [requests[i] for i in order], BLOCK, batch_size=batch_size)
            for i, score in zip(order, batched, strict=True):
                assert abs(score.logprob - alone[i].logprob) < 1e-5
                assert score.greedy == alone[i].greedy and score.tokens == alone[i].tokens
    for (context, continuation), score in zip(requests, alone, strict=True):
        assert score.logprob == pytest.approx(direct_logprob(model, tok, context, continuation)[0], abs=1e-4)


def test_context_and_continuation_are_split_as_the_harness_does(tok: Tokenizer) -> None:
    assert encode_pair(tok, "Hello ", "world") == (tok.encode("Hello"), tok.encode(" world"))
    assert encode_pair(tok, "", "Hello") == ([tok.eot_id], tok.encode("Hello"))
    context, continuation = encode_pair(tok, "I said", "\n\nHi there")
    assert context == tok.encode("I said") and context + continuation == tok.encode("I said\n\nHi there")
    with pytest.raises(GptkitError, match="no tokens of its own"):  # "end" + "ing" is one token
        score_requests(lambda idx: torch.zeros(*idx.shape, 50257), tok, [("The end", "ing")], BLOCK)


@pytest.mark.parametrize("task", ["hellaswag", "hellaswag6", "lambada", "lambada_foundry", "piqa"])
def test_each_task_scores_equal_a_direct_computation(
    task: str, model: GPT, tok: Tokenizer, tmp_path: Path
) -> None:
    files = task_files(tmp_path, 6)
    name, path = {
        "hellaswag6": ("hellaswag", shared_file("hellaswag/hellaswag_val_full.txt.bz2")),
        "lambada_foundry": ("lambada", shared_file("lambada/lambada_openai_llmfoundry.jsonl")),
    }.get(task, (task, files.get(task)))
    data = load_task(name, path, limit=6)
    assert len(data.examples) == 6 and data.skipped == 0
    requests = [(ex.context, c) for ex in data.examples for c in ex.continuations]
    scores = score_requests(logits_fn(model), tok, requests, BLOCK, batch_size=4)
    direct = [direct_logprob(model, tok, c, x) for c, x in requests]
    for score, (logprob, greedy) in zip(scores, direct, strict=True):
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.greedy == greedy
    metrics = Evaluator(EvalSettings([name], files={name: path}, limit=6)).run_all(model, tok, BLOCK, "cpu")[
        name
    ]
    if name == "lambada":
        assert metrics["acc"] == sum(g for _, g in direct) / 6
        assert metrics["ppl"] == pytest.approx(math.exp(-sum(lp for lp, _ in direct) / 6), rel=1e-4)
    else:
        k = len(data.examples[0].continuations)
        acc = acc_norm = 0
        for i, ex in enumerate(data.examples):
            lls = [direct[i * k + j][0] for j in range(k)]
            acc += max(range(k), key=lambda j: lls[j]) == ex.label
            acc_norm += max(range(k), key=lambda j: lls[j] / len(ex.continuations[j][1:])) == ex.label
        assert (metrics["acc"], metrics["acc_norm"]) == (acc / 6, acc_norm / 6)


def test_task_examples_are_built_as_the_harness_builds_them(tmp_path: Path) -> None:
    ex = hellaswag_example(HELLASWAG_RECORDS[0])
    assert (
        ex.context
        == "Home and Garden: How to clean a ceiling fan. Turn the fan off. Make sure the blades stop."
    )
    assert ex.continuations[2] == " Wipe each blade with a damp cloth. Start from the centre."
    assert ex.continuations[1] == " Paint the blades green. Wait a week."
    assert (
        hellaswag_example(HELLASWAG_RECORDS[1]).context
        == "Shaving: A man stands in front of a mirror. The man"
    )
    files = task_files(tmp_path, 3)
    lam = load_task("lambada", files["lambada"]).examples[0]
    text = json.loads(files["lambada"].read_text().splitlines()[0])["text"]
    assert lam.context + lam.continuations[0] == text and lam.continuations[0] == " " + text.split(" ")[-1]
    foundry = load_task("lambada", shared_file("lambada/lambada_openai_llmfoundry.jsonl"), limit=1).examples[
        0
    ]
    assert foundry == lam
    piqa = load_task("piqa", files["piqa"]).examples[0]
    doc = json.loads(files["piqa"].read_text().splitlines()[0])
    assert piqa == Example(f"Question: {doc['goal']}\nAnswer:", (" " + doc["sol1"], " " + doc["sol2"]), 0)
    six = load_task("hellaswag", shared_file("hellaswag/hellaswag_val_full.txt.bz2"), limit=2).examples
    assert six[0].context == "Roof shingle removal: A man is sitting on a roof. he" and six[0].label == 3


# -- lm-evaluation-harness -----------------------------------------------------------------------


def test_lm_eval_gives_the_same_accuracies_on_the_same_examples(
    model: GPT, tok: Tokenizer, tmp_path: Path
) -> None:
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gptkit.interop.hf import export_hf

    n = 12
    files = task_files(tmp_path, n)
    (tmp_path / "piqa_labelled.jsonl").write_text(
        "".join(
            json.dumps(json.loads(line) | {"label": int(label)}) + "\n"
            for line, label in zip(
                files["piqa"].read_text().splitlines(),
                (tmp_path / "valid-labels.lst").read_text().splitlines(),
                strict=True,
            )
        )
    )
    harness = Path(lm_eval.__file__).parent / "tasks"
    local = {  # the harness's own task definitions, reading our local files (no download)
        "hellaswag": ("hellaswag/hellaswag.yaml", "validation", files["hellaswag"]),
        "lambada": ("lambada/lambada_openai.yaml", "test", files["lambada"]),
        "piqa": ("piqa/piqa.yaml", "validation", tmp_path / "piqa_labelled.jsonl"),
    }
    (tmp_path / "tasks").mkdir()
    for task, (yaml, split, path) in local.items():
        (tmp_path / "tasks" / f"local_{task}.yaml").write_text(
            f"include: {harness / yaml}\ntask: local_{task}\ntag: []\ntraining_split: null\n"
            f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    {split}: {path}\n"
        )
    export_hf(model, tok, tmp_path / "hf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        out = lm_eval.simple_evaluate(
            model=HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=8),
            tasks=[f"local_{t}" for t in local],
            task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
            log_samples=True,
        )
    ours = Evaluator(EvalSettings(list(local), files=files)).run_all(model, tok, BLOCK, "cpu")
    import gptkit.api  # gptkit eval takes the exported folder itself: the same accuracies

    folder = gptkit.api.evaluate(tmp_path / "hf", list(local), files=files, device="cpu", progress=False)
    for task in local:
        for metric in ("acc", "acc_norm") if task != "lambada" else ("acc",):
            assert folder[0]["results"][task][metric] == ours[task][metric], (task, metric)
    assert {r["task"] for r in read_results(tmp_path / "hf" / EVAL_FILE)} == set(local)
    for task in local:
        theirs = out["results"][f"local_{task}"]
        assert ours[task]["n"] == n
        for metric in ("acc", "acc_norm") if task != "lambada" else ("acc",):
            assert ours[task][metric] == theirs[f"{metric},none"], (task, metric)
        data = load_task(task, files[task])
        requests = [(ex.context, c) for ex in data.examples for c in ex.continuations]
        scores = score_requests(logits_fn(model), tok, requests, BLOCK)
        their_lls = [
            resp[0][0]
            for s in sorted(out["samples"][f"local_{task}"], key=lambda s: s["doc_id"])
            for resp in s["resps"]
        ]
        assert len(their_lls) == len(scores)
        for score, ll in zip(scores, their_lls, strict=True):
            assert score.logprob == pytest.approx(ll, abs=1e-3)
    assert ours["lambada"]["ppl"] == pytest.approx(
        out["results"]["local_lambada"]["perplexity,none"], rel=1e-3
    )


# -- perplexity ----------------------------------------------------------------------------------


def test_windows_score_every_target_once() -> None:
    for n, window, stride in [(10, 4, 4), (10, 4, 1), (11, 4, 3), (5, 8, 2), (4, 3, 3)]:
        targets = []
        for start, end, scored in windows(n, window, stride):
            assert 0 < end - start <= window and 0 < scored <= end - start
            targets += list(range(end - scored + 1, end + 1))
        assert targets == list(range(1, n))
    with pytest.raises(GptkitError, match="stride"):
        windows(10, 4, 5)


def test_perplexity_with_stride_equal_to_window_is_the_non_overlapping_computation(
    model: GPT, tok: Tokenizer, tmp_path: Path
) -> None:
    text = shared_file("tinyshakespeare/input.txt").read_text()[:3000]
    path = tmp_path / "text.txt"
    path.write_text(text)
    tokens = read_tokens(path, tok)
    assert tokens[0] == tok.eot_id and tokens[1:].tolist() == tok.encode(text)
    nll = 0.0
    with torch.no_grad():  # chunks of BLOCK inputs, each predicting the next BLOCK tokens
        for start in range(0, len(tokens) - 1, BLOCK):
            chunk = torch.from_numpy(tokens[start : start + BLOCK + 1].astype(np.int64))
            logits = model(chunk[None, :-1])[0]
            nll += float(F.cross_entropy(logits.double(), chunk[1:], reduction="sum"))
    forward = logits_fn(model)
    for batch_size in (1, 5):
        result = perplexity(forward, tokens, tok, window=BLOCK, stride=BLOCK, batch_size=batch_size)
        assert result["tokens"] == len(tokens) - 1 and result["bytes"] == len(text.encode("utf-8"))
        assert result["loss"] == pytest.approx(nll / (len(tokens) - 1), rel=1e-6)
        assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-6)
    overlapping = perplexity(forward, tokens, tok, window=BLOCK, stride=BLOCK // 4)
    assert overlapping["tokens"] == len(tokens) - 1 and overlapping["loss"] != pytest.approx(result["loss"])


# -- results, checkpoints, CLI ---------------------------------------------------------------------


def write_run(run: Path, steps: list[int], data: str) -> None:
    for seed, step in enumerate(steps):
        m = tiny_model(seed)
        config = RunConfig(model=m.config).model_dump(mode="json")
        config["data"]["path"] = data
        save_checkpoint(
            run / "checkpoints" / f"step_{step:08d}.pt",
            model_state=m.state_dict(),
            config=config,
            tokenizer=gpt2_tokenizer().describe(),
            progress={"step": step},
        )


def test_all_checkpoints_writes_results_and_plot_once(tmp_path: Path) -> None:
    import gptkit.api

    text = tmp_path / "text.txt"
    text.write_text(shared_file("tinyshakespeare/input.txt").read_text()[:2000])
    run = tmp_path / "run"
    write_run(run, [10, 20], str(text))
    kwargs = dict(limit=4, data_dir=SHARED_DATA, all_checkpoints=True, tensorboard=True)
    first = gptkit.api.evaluate(run, "perplexity,piqa", **kwargs)
    assert [r["step"] for r in first] == [10, 20]
    records = read_results(run / EVAL_FILE)
    assert {(r["step"], r["task"]) for r in records} == {
        (s, t) for s in (10, 20) for t in ("perplexity", "piqa")
    }
    assert all(r["metrics"]["n"] == 4 for r in records if r["task"] == "piqa")
    assert (run / EVAL_PNG).read_bytes()[:4] == b"\x89PNG"
    before = (run / EVAL_FILE).read_text()
    assert gptkit.api.evaluate(run, "piqa,perplexity", **kwargs) == []  # nothing left to do
    assert (run / EVAL_FILE).read_text() == before
    again = gptkit.api.evaluate(run, "piqa,lambada", **kwargs)  # only lambada is new
    assert [set(r["results"]) for r in again] == [{"lambada"}, {"lambada"}]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("eval/piqa_acc")] == [10, 20]


def gptkit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_gptkit(*args, env={**os.environ, "GPTKIT_NO_PROGRESS": "1"})


def test_eval_command_prints_a_table_and_reports_bad_input(tmp_path: Path) -> None:
    import gptkit.api

    run = tmp_path / "run"
    write_run(run, [5], str(tmp_path / "nowhere"))
    piqa = tmp_path / "valid.jsonl"
    lines = shared_file("piqa/valid.jsonl").read_text().splitlines()[:5]
    piqa.write_text(
        "\n".join([lines[0], "{not json", lines[1], '{"goal": "no solutions"}', *lines[2:]]) + "\n"
    )
    (tmp_path / "valid-labels.lst").write_text("0\n1\n0\n1\n0\n1\n0\n")
    done = gptkit_cli("eval", str(run), "--tasks", "piqa", "--file", f"piqa={piqa}", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "skipped 2 malformed line(s) (first: line 2:" in done.stderr
    assert "piqa  acc_norm" in done.stdout and "step 5" in done.stdout
    assert read_results(run / EVAL_FILE)[0]["metrics"]["skipped"] == 2

    bad = gptkit_cli("eval", str(run), "--tasks", "piqa,hellaswagg", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "unknown task 'hellaswagg'; known tasks: perplexity, hellaswag, lambada, piqa" in bad.stderr
    with pytest.raises(GptkitError) as missing:
        gptkit.api.evaluate(run, "hellaswag", data_dir=tmp_path / "d")
    assert f"{tmp_path / 'd' / 'hellaswag' / 'hellaswag_val.jsonl'}" in str(missing.value)
    assert "rowanz/hellaswag" in str(missing.value)
    with pytest.raises(GptkitError, match="perplexity data .* not found"):
        gptkit.api.evaluate(run, "perplexity")


def test_bad_task_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="download it from https://openaipublic"):
        find_task_file("lambada", tmp_path)
    (tmp_path / "lambada_test.jsonl").write_text('{"text": "nospace"}\n[1]\n')
    with pytest.raises(GptkitError, match=r"holds no lambada example \(first: line 1: text has no space"):
        load_task("lambada", find_task_file("lambada", tmp_path))
    (tmp_path / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(GptkitError, match="valid-labels.lst"):
        load_task("piqa", tmp_path / "valid.jsonl")
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(GptkitError, match="has 2 labels but"):
        load_task("piqa", tmp_path / "valid.jsonl")
    six = tmp_path / "hs.txt"
    six.write_text("ctx\n7\na\nb\nc\nd\nctx\n1\na\nb\nc\nd\nextra\n")
    data = load_task("hellaswag", six)
    assert len(data.examples) == 1 and data.skipped == 2 and "label '7'" in data.problem
    with pytest.raises(GptkitError, match="known tasks"):
        EvalSettings(["bleu"])


def test_training_runs_the_configured_tasks_at_each_evaluation(tmp_path: Path) -> None:
    from gptkit.api import prepare
    from gptkit.eval.run import TrainingTasks
    from gptkit.training.launch import train

    assert set(KNOWN_TASKS) == set(EvalConfig.model_fields["tasks"].annotation.__args__[0].__args__)
    text = shared_file("tinyshakespeare/input.txt").read_text()[:20000]
    (tmp_path / "docs").mkdir()
    for i in range(20):  # 20 documents: 4 go to val
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(text[i * 1000 : (i + 1) * 1000])
    prepare(
        [str(tmp_path / "docs")],
        tmp_path / "data",
        tokenizer="gpt2",
        val_fraction=0.2,
        progress=False,
        workers=1,
    )
    config = load_config(
        None,
        [
            "model.n_layer=1",
            "model.n_head=2",
            "model.n_embd=32",
            "model.block_size=32",
            "train.micro_batch_size=4",
            "train.max_steps=4",
            "train.precision=fp32",
            "eval.every=2",
            "eval.batches=1",
            "eval.sample_tokens=0",
            "eval.tasks=[perplexity, piqa]",
            "eval.task_limit=3",
            f"eval.task_data={SHARED_DATA}",
            f"data.path={tmp_path / 'data'}",
            f"runs_dir={tmp_path / 'runs'}",
        ],
    )
    shared_file("piqa/valid.jsonl")
    with pytest.raises(ValueError, match="pass the task evaluator"):
        train(config)  # the trainer does not reach up for one
    result = train(config, tasks=TrainingTasks(config.eval, config.data.path))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    for r in val:
        assert 0 <= r["piqa_acc"] <= 1 and r["perplexity_loss"] > 0 and "val_loss" in r


def test_hf_folder_needs_text_for_perplexity_and_shows_no_step(
    tmp_path: Path, model: GPT, tok: Tokenizer
) -> None:
    """A HF folder names no training data: perplexity without --text is one line asking for it (not
    gptkit's default data and a tokenizer mismatch); with it, the table's header has no "step None"."""
    from gptkit.interop.hf import export_hf

    export_hf(model, tok, tmp_path / "hf")
    missing = gptkit_cli("eval", str(tmp_path / "hf"), "--device", "cpu")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("gptkit: error: perplexity needs text") and "--text" in missing.stderr
    text = tmp_path / "text.txt"
    text.write_text(shared_file("tinyshakespeare/input.txt").read_text()[:3000])
    done = gptkit_cli("eval", str(tmp_path / "hf"), "--text", str(text), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(tmp_path / "hf")
    assert "perplexity  bits_per_byte" in done.stdout


def test_all_checkpoints_answer_test_questions_into_eval_md_and_mlflow(tmp_path: Path) -> None:
    """--prompts: every checkpoint answers each question greedily (a chat-tuned one in its template),
    the answers go to eval.md and MLflow as text, and running it again adds nothing."""
    import string

    from mlflow.tracking import MlflowClient

    import gptkit
    from gptkit.generate import ChatTemplate, SampleSettings
    from gptkit.tokenizer import CharTokenizer
    from gptkit.tracking import mlflow_local_uri

    tok = CharTokenizer.train([string.printable])
    template = ChatTemplate.named("chat")
    run = tmp_path / "run"
    for seed, step in enumerate([10, 20]):
        torch.manual_seed(seed)
        config = load_config(
            None, ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64"]
        )
        config.model.vocab_size = tok.vocab_size
        m = GPT(config.model)
        with torch.no_grad():  # peaked distributions: answers of some length before any end-of-text
            for p in m.parameters():
                p.mul_(8)
        save_checkpoint(
            run / "checkpoints" / f"step_{step:08d}.pt",
            model_state=m.state_dict(),
            config=config.model_dump(mode="json"),
            tokenizer=tok.describe(),
            progress={"step": step},
            chat_template=template.to_dict() if step == 20 else None,  # the later one is chat-tuned
        )
    questions = ["What do bees make?", "Name a colour."]
    prompts = tmp_path / "questions.txt"
    prompts.write_text("\n".join(questions[:1]) + "\n\n" + questions[1] + "\n")

    args = ["eval", str(run), "--all-checkpoints", "--prompts", str(prompts), "--max-new-tokens", "12"]
    first = gptkit_cli(*args, "--mlflow", "--device", "cpu")
    assert first.returncode == 0, first.stderr[-3000:]

    # what each checkpoint says, computed here with the sampler directly
    greedy = SampleSettings.of(temperature=0, max_new_tokens=12)
    base = gptkit.load(run / "checkpoints" / "step_00000010.pt")
    expected = {10: [base.generate(q, **greedy.model_dump()).rstrip() for q in questions]}
    tuned = gptkit.load(run / "checkpoints" / "step_00000020.pt")
    expected[20] = []
    for q in questions:
        ids, _ = template.encode(tok, [{"role": "user", "content": q}], add_generation_prefix=True)
        text = tok.decode(tuned.sampler.generate_ids([ids], greedy)[0])
        for stop in template.stop:
            text = text.split(stop)[0]
        expected[20].append(text.rstrip())
    assert any(a for answers in expected.values() for a in answers), "some answer is not empty"
    records = {r["step"]: r for r in read_results(run / EVAL_FILE) if r["task"] == "answers"}
    for step in (10, 20):
        assert records[step]["answers"] == [
            {"question": q, "answer": a} for q, a in zip(questions, expected[step], strict=True)
        ]
        assert records[step]["file"] == str(prompts.resolve())
    eval_md = (run / "eval.md").read_text()
    assert eval_md.index("## step 10:") < eval_md.index("## step 20:")
    for step in (10, 20):
        section = eval_md.split(f"## step {step}:")[1].split("## step")[0]
        for q, a in zip(questions, expected[step], strict=True):
            assert f"`{q}`" in section and f"```text\n{a}\n```" in section

    client = MlflowClient(mlflow_local_uri(run))
    run_id = (run / "mlflow_run_id").read_text().strip()

    def logged() -> dict[str, str]:
        files = [f.path for f in client.list_artifacts(run_id, "answers")]
        return {
            f: Path(client.download_artifacts(run_id, f, str(tmp_path / "dl"))).read_text() for f in files
        }

    texts = logged()
    assert sorted(texts) == ["answers/step_00000010.md", "answers/step_00000020.md"]
    for step in (10, 20):
        for q, a in zip(questions, expected[step], strict=True):
            assert f"**{q}**\n\n```text\n{a}\n```" in texts[f"answers/step_{step:08d}.md"]

    before = (run / EVAL_FILE).read_text(), eval_md
    again = gptkit_cli(*args, "--mlflow", "--device", "cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == "" and again.stderr.count("already evaluated on answers; skipped") == 2
    assert ((run / EVAL_FILE).read_text(), (run / "eval.md").read_text()) == before
    assert logged() == texts and len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_perplexity_data_with_ids_outside_the_vocabulary_is_one_line(tmp_path: Path) -> None:
    """A val shard with an id >= vocab (whose sha256 was recorded so) was an IndexError in the model."""
    import hashlib

    from gptkit.api import prepare
    from gptkit.data.shards import PreparedData

    prepare([], tmp_path / "d", tokenizer="char", progress=False, workers=1)
    data = PreparedData.open(tmp_path / "d")
    meta = json.loads((data.path / "meta.json").read_text())
    entry = meta["splits"]["val"]["shards"][0]
    ids = np.fromfile(data.path / entry["file"], dtype=data.dtype)
    ids[5] = 60000
    ids.tofile(data.path / entry["file"])
    entry["sha256"] = hashlib.sha256(ids.tobytes()).hexdigest()
    (data.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GptkitError, match=r"hold token id 60000, but the vocabulary has 104 ids"):
        read_tokens(data.path, data.tokenizer())
