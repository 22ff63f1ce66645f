"""`gptkit prepare`: shards that decode back to the documents, a seeded split, safe interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from cli import gptkit_cli

from gptkit.api import prepare
from gptkit.data.prepare import is_val
from gptkit.data.shards import PreparedData, token_dtype
from gptkit.errors import GptkitError
from gptkit.tokenizer import gpt2_tokenizer

DOCS = [
    f"Document {i}: " + " ".join(f"word{i * 7 + j}" for j in range(i % 13 + 1)) + " ünïcödé ✓"
    for i in range(60)
]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text(
        "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8"
    )
    return path


def split_docs(data: PreparedData, split: str) -> list[str]:
    """Decode a split and cut it at end-of-text tokens: the documents it holds, in order."""
    tok = data.tokenizer()
    ids = np.concatenate([np.asarray(s) for s in data.shards(split)] or [np.zeros(0, data.dtype)])
    docs, start = [], 0
    for end in np.flatnonzero(ids == tok.eot_id):
        docs.append(tok.decode(ids[start:end].tolist()))
        start = end + 1
    assert start == len(ids), "every split ends with an end-of-text token"
    return docs


def run(tmp_path: Path, sources: list[Path | str], name: str = "out", **settings) -> PreparedData:
    settings.setdefault("workers", 1)
    prepare([str(s) for s in sources], tmp_path / name, progress=False, **settings)
    return PreparedData.open(tmp_path / name)


def test_shards_decode_back_to_the_documents(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    data = run(tmp_path, [src], val_fraction=0.3, seed=3)
    train, val = split_docs(data, "train"), split_docs(data, "val")
    assert sorted(train + val) == sorted(DOCS)
    assert not set(train) & set(val), "train and val share no document"
    assert train == [d for d in DOCS if d in set(train)], "documents keep their order"
    meta = data.meta
    assert meta["tokenizer"]["type"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["documents"] == len(train) and meta["splits"]["val"]["documents"] == len(
        val
    )
    enc = gpt2_tokenizer()
    assert meta["splits"]["val"]["tokens"] == sum(len(enc.encode(d)) + 1 for d in val)
    assert meta["sources"][0]["sha256"] and meta["sources"][0]["bytes"] == src.stat().st_size
    assert 5 < len(val) < 30


def test_split_is_seeded(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    a = split_docs(run(tmp_path, [src], "a", seed=1), "val")
    b = split_docs(run(tmp_path, [src], "b", seed=1), "val")
    c = split_docs(run(tmp_path, [src], "c", seed=2), "val")
    assert a == b and a != c


def test_workers_give_identical_output(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS * 40)
    one = run(tmp_path, [src], "one", workers=1, shard_tokens=4096)
    two = run(tmp_path, [src], "two", workers=2, shard_tokens=4096)
    for split in ("train", "val"):
        assert one.meta["splits"][split] == two.meta["splits"][split]
        for a, b in zip(one.shards(split), two.shards(split), strict=True):
            assert np.array_equal(a, b)


def test_shards_are_bounded(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS * 20)
    data = run(tmp_path, [src], shard_tokens=1024, val_fraction=0.0)
    shards = data.meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] <= 1024 for s in shards)
    assert sorted(split_docs(data, "train")) == sorted(DOCS * 20)
    assert data.meta["splits"]["val"] == {"tokens": 0, "documents": 0, "shards": []}


def test_one_large_text_file_is_chunked_before_the_split(tmp_path: Path, shakespeare: Path) -> None:
    data = run(tmp_path, [shakespeare], tokenizer="char", val_fraction=0.1)
    text = shakespeare.read_text()
    tok = data.tokenizer()
    parts = {
        s: tok.decode(np.concatenate([np.asarray(x) for x in data.shards(s)]).tolist())
        for s in ("train", "val")
    }
    # Only the very last chunk of the file is followed by end-of-text.
    eot = "<|endoftext|>"
    assert (parts["train"] + parts["val"]).count(eot) == 1
    assert len(parts["train"]) + len(parts["val"]) - len(eot) == len(text)
    share = data.meta["splits"]["val"]["tokens"] / (
        data.meta["splits"]["train"]["tokens"] + data.tokens("val")
    )
    assert 0.05 < share < 0.15, share
    assert data.meta["splits"]["val"]["documents"] >= 5
    # Every chunk is a run of whole lines of the original text, in order.
    assert all(line in text for line in parts["val"].split("\n")[:50])


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe", "char"])
def test_a_chunked_file_gives_the_tokens_of_the_whole_file(
    tmp_path: Path, shakespeare: Path, tokenizer: str
) -> None:
    """Chunks end where the tokenizers' pre-tokenizers split the whole text too: the prepared tokens
    are the whole file's (GPT-2: 338,025, as tiktoken gives; cutting after newlines gave 338,022)."""
    settings = {"vocab_size": 512} if tokenizer == "bpe" else {}
    data = run(tmp_path, [shakespeare], tokenizer=tokenizer, val_fraction=0.0, **settings)
    assert data.meta["splits"]["train"]["documents"] > 100  # chunks
    ids = np.concatenate([np.asarray(x) for x in data.shards("train")]).tolist()
    tok = data.tokenizer()
    assert ids[-1] == tok.eot_id
    whole = tok.encode(shakespeare.read_text(encoding="utf-8"))
    assert ids[:-1] == whole
    if tokenizer == "gpt2":
        assert len(whole) == 338_025


def test_folder_parquet_and_hf_sources(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCS[0])
    (folder / "sub" / "b.md").write_text(DOCS[1])
    (folder / ".hidden.txt").write_text("not me")
    (folder / "notes.bin").write_bytes(b"\x00\x01")
    write_jsonl(folder / "c.jsonl", DOCS[2:5])
    pq.write_table(pa.table({"text": DOCS[5:9], "n": list(range(4))}), folder / "d.parquet")
    data = run(tmp_path, [folder], val_fraction=0.0)
    assert split_docs(data, "train") == [DOCS[0], *DOCS[2:5], *DOCS[5:9], DOCS[1]]  # sorted paths

    pytest.importorskip("datasets")
    hf_dir = tmp_path / "hf_dataset"
    hf_dir.mkdir()
    write_jsonl(hf_dir / "train.jsonl", DOCS[:10], field="content")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    data = run(tmp_path, [f"hf:{hf_dir}"], "hf", val_fraction=0.0, text_field="content")
    assert split_docs(data, "train") == DOCS[:10]
    with pytest.raises(GptkitError, match=r"no field 'text' \(fields: content, id\)"):
        run(tmp_path, [f"hf:{hf_dir}"], "hf2")


def test_builtin_default_corpus(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    data = run(tmp_path, [], tokenizer="char")
    docs = split_docs(data, "train") + split_docs(data, "val")
    assert sorted(docs) == sorted(topics.values())
    assert data.meta["sources"][0]["source"] == "builtin:pydoc"


def test_bpe_tokenizer_is_saved_with_the_data(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS * 5)
    data = run(tmp_path, [src], tokenizer="bpe", vocab_size=300)
    assert (data.path / "tokenizer.json").is_file()
    assert data.vocab_size <= 300 and data.tokenizer().fingerprint() == data.meta["tokenizer_fingerprint"]
    assert sorted(split_docs(data, "train") + split_docs(data, "val")) == sorted(DOCS * 5)


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    run(tmp_path, [src], tokenizer="char")
    with pytest.raises(GptkitError, match=r"already holds prepared data; pass --overwrite"):
        run(tmp_path, [src])
    prepare([str(src)], tmp_path / "out", overwrite=True, progress=False, workers=1)
    assert PreparedData.open(tmp_path / "out").meta["tokenizer"]["type"] == "gpt2"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(GptkitError, match=r"not empty and holds no prepared data"):
        run(tmp_path, [src], "mine", overwrite=True)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda d: d / "missing.txt", r"source '.*missing.txt' not found"),
        (lambda d: _file(d / "empty.txt", b""), r"no text found in"),
        (lambda d: _file(d / "blank.jsonl", b"\n\n"), r"no text found in"),
        (
            lambda d: _file(d / "bad.txt", b"fine\n" * 3 + b"\xff\xfe oops\n"),
            r"bad.txt \(byte 15\): invalid UTF-8",
        ),
        (
            lambda d: _file(d / "bad.jsonl", b'{"text": "a"}\n{"body": "b"}\n'),
            r"bad.jsonl:2: missing text field 'text'",
        ),
        (lambda d: _file(d / "bad2.jsonl", b'{"text": "a"}\n{oops\n'), r"bad2.jsonl:2: not valid JSON"),
        (lambda d: _file(d / "bad3.jsonl", b'{"text": 5}\n'), r"bad3.jsonl:1: field 'text' holds int"),
        (
            lambda d: _file(d / "bad4.jsonl", b'{"text": "a\\ud800b"}\n'),
            r"bad4.jsonl:1: invalid Unicode .*surrogate",
        ),
        (lambda d: _file(d / "x.parquet", b"not parquet"), r"cannot read parquet file"),
        (lambda d: _empty_dir(d / "nothing"), r"holds no readable files"),
    ],
)
def test_bad_input_gives_a_one_line_error(tmp_path: Path, make, error: str) -> None:
    with pytest.raises(GptkitError, match=error) as e:
        run(tmp_path, [make(tmp_path)])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*")), "no half-written output is left behind"


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


def test_skip_bad_counts_and_reports(tmp_path: Path) -> None:
    src = _file(
        tmp_path / "mixed.jsonl", b'{"text": "good one"}\n{"body": "b"}\nnot json\n{"text": "good two"}\n'
    )
    data = run(tmp_path, [src], skip_bad=True, val_fraction=0.0)
    assert split_docs(data, "train") == ["good one", "good two"]
    assert data.meta["skipped"]["documents"] == 2
    assert "mixed.jsonl:2: missing text field" in data.meta["skipped"]["examples"][0]


def test_loader_rejects_damaged_data(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    data = run(tmp_path, [src])
    shard = data.path / data.meta["splits"]["train"]["shards"][0]["file"]
    with pytest.raises(GptkitError, match=r"no meta.json.*gptkit prepare"):
        PreparedData.open(tmp_path)
    with pytest.raises(GptkitError, match=r"different tokenizer \(gpt2\)"):
        data.check_tokenizer("0" * 64)
    data.check_tokenizer(gpt2_tokenizer().fingerprint())
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(GptkitError, match=r"damaged: prepare the data again"):
        PreparedData.open(data.path)
    (data.path / "meta.json").write_text("{")
    with pytest.raises(GptkitError, match=r"corrupt"):
        PreparedData.open(data.path)


def test_token_dtype() -> None:
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_is_val_is_a_seeded_fraction() -> None:
    keys = [f"doc:{i}" for i in range(20000)]
    share = sum(is_val(k, 0, 0.1) for k in keys) / len(keys)
    assert 0.09 < share < 0.11
    assert [is_val(k, 0, 0.1) for k in keys[:500]] == [is_val(k, 0, 0.1) for k in keys[:500]]
    assert not any(is_val(k, 0, 0.0) for k in keys)


@pytest.mark.slow
def test_killed_run_leaves_nothing_a_loader_or_rerun_accepts(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "big.jsonl", DOCS * 4000)  # a few seconds of work
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "gptkit",
        "prepare",
        str(src),
        "--out",
        str(out),
        "--workers",
        "2",
        "--shard-tokens",
        "20000",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill it once shards are being written
        partial = list(tmp_path.glob(".out.partial-*"))
        if partial and len(list(partial[0].glob("train_*.bin"))) >= 2:
            break
        time.sleep(0.02)
    else:
        pytest.fail("prepare never started writing shards")
    helpers = psutil.Process(proc.pid).children(recursive=True)  # the forkserver and the workers
    assert helpers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(helpers, timeout=15)
    assert not alive, "worker processes leave when the prepare that started them is killed"
    assert not out.exists()
    with pytest.raises(GptkitError, match=r"an interrupted prepare left"):
        PreparedData.open(out)
    # A re-run removes the leftovers and finishes.
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "left by an interrupted prepare" in rerun.stderr
    assert not list(tmp_path.glob(".out.partial-*"))
    data = PreparedData.open(out)
    assert sorted(split_docs(data, "train") + split_docs(data, "val")) == sorted(DOCS * 4000)


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_prepare_killed_while_swapping_folders_loses_no_data(tmp_path: Path) -> None:
    """Killed between moving the old folder aside and moving the new one in: the next prepare puts
    the old data back (and, with --overwrite, replaces it); killed after: it removes the leftover."""
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    prepare([src], out, tokenizer="char", progress=False, workers=1)
    before = sorted(split_docs(PreparedData.open(out), "train"))
    aside = tmp_path / f".out.old-{dead_pid()}"
    out.rename(aside)  # where the killed prepare left it: no `out`
    with pytest.raises(GptkitError, match=r"an interrupted prepare left .*\.out\.old-"):
        PreparedData.open(out)
    with pytest.raises(GptkitError, match="pass --overwrite"):  # put back, so not silently replaced
        prepare([src], out, tokenizer="char", progress=False, workers=1)
    assert not aside.exists() and sorted(split_docs(PreparedData.open(out), "train")) == before

    (tmp_path / f".out.old-{dead_pid()}").mkdir()  # killed after the new folder was in place
    prepare([src], out, tokenizer="char", progress=False, workers=1, overwrite=True)
    assert not list(tmp_path.glob(".out.old-*"))
    assert sorted(split_docs(PreparedData.open(out), "train")) == before


def test_workers_run_from_a_script_on_standard_input(tmp_path: Path) -> None:
    """`python - < script.py` names its main module "<stdin>"; worker processes must still start."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("notes about models\n" * 500)
    script = "import gptkit\ngptkit.prepare(['notes'], 'out', tokenizer='gpt2', workers=2, progress=False)\n"
    out = subprocess.run(
        [sys.executable, "-"], input=script, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert PreparedData.open(tmp_path / "out").tokenizer().describe() == gpt2_tokenizer().describe()


def test_shards_carry_a_sha256_and_edited_meta_is_refused(tmp_path: Path) -> None:
    """Garbage ids inside the vocabulary, an edited split total and an edited vocab_size were all
    accepted (the last one failed later with a traceback); folders without checksums still load."""
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    data = run(tmp_path, [src], tokenizer="char")
    meta_path = data.path / "meta.json"
    pristine = meta_path.read_text()
    shard = data.path / data.meta["splits"]["train"]["shards"][0]["file"]
    assert all(
        len(s["sha256"]) == 64 for split in ("train", "val") for s in data.meta["splits"][split]["shards"]
    )
    intact = gptkit_cli("info", str(data.path), "--verify")
    assert intact.returncode == 0 and "verified: 2 shard(s) match the sha256" in intact.stdout, intact.stderr

    original = shard.read_bytes()
    ids = np.frombuffer(original, dtype=data.dtype).copy()
    ids[100:110] = ids[200]  # valid ids, wrong text: only the checksum sees it
    shard.write_bytes(ids.tobytes())
    with pytest.raises(
        GptkitError, match=r"train_000000.bin fails its content check.*prepare the data again"
    ):
        PreparedData.open(data.path)  # small data: verified on open
    damaged = gptkit_cli("info", str(data.path), "--verify")
    assert damaged.returncode == 2 and damaged.stderr.count("\n") == 1, damaged.stderr
    assert "fails its content check" in damaged.stderr

    meta = json.loads(pristine)
    for split in ("train", "val"):
        for s in meta["splits"][split]["shards"]:
            del s["sha256"]
    meta_path.write_text(json.dumps(meta))  # as prepared by an earlier gptkit
    assert PreparedData.open(data.path).verify() == 0
    assert "no shard has a sha256" in gptkit_cli("info", str(data.path), "--verify").stdout
    shard.write_bytes(original)

    meta = json.loads(pristine)
    meta["splits"]["train"]["tokens"] += 1000
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(GptkitError, match=r"says the train split has \d+ tokens, but its shards hold \d+"):
        PreparedData.open(data.path)

    meta = json.loads(pristine)
    meta["vocab_size"] = 50
    meta_path.write_text(json.dumps(meta))
    edited = gptkit_cli("info", str(data.path))
    assert edited.returncode == 2 and edited.stderr.count("\n") == 1, edited.stderr
    assert "says vocab_size 50 and dtype uint16, but its tokenizer has" in edited.stderr
    meta_path.write_text(pristine)
    assert PreparedData.open(data.path, verify=True).verify() == 2
