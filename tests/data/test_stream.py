"""The streamed pipeline on its own: mixture shares, packing, one pass per epoch, hf: folders, bad input."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit.api import prepare
from gptkit.config import RunConfig, load_config
from gptkit.data.mixing import Packer, StreamBatches
from gptkit.data.streams import stream_tokenizer
from gptkit.errors import GptkitError
from gptkit.tokenizer import gpt2_tokenizer

# words that are one GPT-2 token each with a leading space, and no word is in both lists
WORDS_A = [" the", " of", " and", " to", " in", " is", " was", " for"]
WORDS_B = [" cat", " dog", " red", " blue", " sun", " tree", " car", " fish"]


def write_jsonl(path: Path, words: list[str], n: int, lo: int, hi: int, seed: int) -> Path:
    rnd = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(
                json.dumps({"text": "".join(rnd.choice(words) for _ in range(rnd.randint(lo, hi)))}) + "\n"
            )
    return path


def stream_config(sources: str, *overrides: str) -> RunConfig:
    return load_config(None, ["data.stream=true", f"data.sources={sources}", *overrides])


def pipeline(config: RunConfig, batch: int = 4, block: int = 64, seed: int = 0) -> StreamBatches:
    return StreamBatches(config.data, stream_tokenizer(config.data).tokenizer(), batch, block, seed)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A: short documents (5-40 tokens), B: long ones (30-200): document shares are far from token shares."""
    root = tmp_path_factory.mktemp("mix")
    return (
        write_jsonl(root / "a.jsonl", WORDS_A, 3000, 5, 40, 1),
        write_jsonl(root / "b.jsonl", WORDS_B, 600, 30, 200, 2),
    )


def test_token_shares_follow_the_weights_within_3_sigma(two_sources: tuple[Path, Path]) -> None:
    a, b = two_sources
    config = stream_config(
        f"[{{path: '{a}', weight: 0.7}}, {{path: '{b}', weight: 0.3}}]", "data.shuffle_buffer=64"
    )
    source = pipeline(config, batch=4, block=64)
    tok = gpt2_tokenizer()
    ids_a = {tok.encode(w)[0] for w in WORDS_A}
    ids_b = {tok.encode(w)[0] for w in WORDS_B}
    assert len(ids_a) == len(WORDS_A) and len(ids_b) == len(WORDS_B) and not ids_a & ids_b
    shares = []
    for _ in range(200):
        ids = source.next_batch().ids.flatten().tolist()
        n_a, n_b = sum(i in ids_a for i in ids), sum(i in ids_b for i in ids)
        shares.append(n_a / (n_a + n_b))
    mean, sigma = float(np.mean(shares)), float(np.std(shares, ddof=1)) / np.sqrt(len(shares))
    assert abs(mean - 0.7) <= 3 * sigma, (mean, sigma)
    assert abs((1 - mean) - 0.3) <= 3 * sigma
    logged = source.shares()  # what metrics.jsonl and report.md show
    assert abs(logged[str(a)] - 0.7) < 0.05 and abs(sum(logged.values()) - 1) < 1e-9


def documents(n: int, seed: int, eot: int = 0) -> list[np.ndarray]:
    """Document k holds ids k*1000+1, k*1000+2, ... then end-of-text: its origin is in every id."""
    rnd = random.Random(seed)
    lengths = [rnd.randint(1, 88) for _ in range(n)]
    lengths = [63 if n == 64 else n for n in lengths]  # no cut that leaves the end-of-text alone
    return [np.array([*range(k * 1000 + 1, k * 1000 + 1 + m), eot]) for k, m in enumerate(lengths)]


def packed(docs: list[np.ndarray], mode: str, block: int = 64) -> tuple[Packer, list]:
    packer = Packer(block, mode, eot_id=0)
    rows = []
    for d in docs:
        packer.add(d)
        while (row := packer.row()) is not None:
            rows.append(row)
    packer.flush()
    while (row := packer.row()) is not None:
        rows.append(row)
    return packer, rows


def test_best_fit_keeps_documents_whole_and_in_order_and_cuts_fewer_than_concat() -> None:
    docs = documents(400, seed=3)
    fit, fit_rows = packed(docs, "best_fit")
    cat, cat_rows = packed(docs, "concat")
    pieces: dict[int, list[int]] = {}  # document -> the rows its tokens are in
    for r, (ids, extra) in enumerate(fit_rows):
        targets, segments = extra
        order = []
        for seg in sorted(set(segments.tolist()) - {-1}):
            toks = ids[segments == seg]
            body = toks[toks != 0]
            doc = int(body[0]) // 1000
            assert (np.diff(body) == 1).all() and (body // 1000 == doc).all(), (
                "a segment is one document, in order"
            )
            assert (targets[segments == seg][:-1] == toks[1:]).all() and targets[segments == seg][-1] == -100
            order.append(doc)
            pieces.setdefault(doc, []).append(r)
        assert order == sorted(order), "documents stay in the order they came within a window"
        assert (targets[segments == -1] == -100).all()
    cut_by_count = sum(len(rows) > 1 for rows in pieces.values())
    assert cut_by_count == fit.cut
    # concat: the windows (stride block) are the documents' tokens in order, and a document is cut when
    # its ids span two windows
    stream = np.concatenate(docs)
    for k, (row, extra) in enumerate(cat_rows):
        assert extra is None and (row == stream[k * 64 : k * 64 + 65]).all()
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])  # each position's document
    window = np.arange(len(stream)) // 64  # the window whose ids hold each position
    assert sum(len(set(window[doc_of == k])) > 1 for k in range(len(docs))) == cat.cut
    assert fit.cut < cat.cut, (fit.cut, cat.cut)
    assert fit.padding > 0


def test_every_token_of_a_source_appears_once_per_epoch(tmp_path: Path) -> None:
    """Two epochs of a small corpus through the shuffle buffer and best-fit: every document's tokens
    are in the windows exactly twice, then the source is spent."""
    src = write_jsonl(tmp_path / "small.jsonl", WORDS_A + WORDS_B, 150, 1, 120, seed=5)
    config = stream_config(
        f"[{{path: '{src}', epochs: 2}}]",
        "data.shuffle_buffer=16",
        "data.pack=best_fit",
        "data.when_exhausted=renormalise",
    )
    source = pipeline(config, batch=1, block=48)
    tok = gpt2_tokenizer()
    expected: Counter[int] = Counter()
    for line in src.read_text().splitlines():
        expected.update(tok.encode(json.loads(line)["text"]) + [tok.eot_id])
    seen: Counter[int] = Counter()
    with pytest.raises(GptkitError, match="every source ran out"):
        while True:
            batch = source.next_batch()
            seen.update(batch.ids[batch.segments != -1].tolist())
    assert seen == Counter({k: 2 * v for k, v in expected.items()})


def test_hf_sources_read_a_local_jsonl_folder_and_a_saved_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", WORDS_A, 50, 3, 20, seed=7)
    texts = [json.loads(line)["text"] for line in (folder / "train.jsonl").read_text().splitlines()]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(saved))
    tok = gpt2_tokenizer()
    expected = Counter(t for text in texts for t in [*tok.encode(text), tok.eot_id])
    for spec, field in ((f"hf:{folder}@train", "text"), (f"hf:{saved}", "body")):
        config = stream_config(
            f"[{{path: '{spec}', text_field: {field}}}]",
            "data.pack=best_fit",
            "data.when_exhausted=renormalise",
            "data.workers=2",
        )
        source, seen = pipeline(config, batch=1, block=32), Counter()
        with pytest.raises(GptkitError, match="every source ran out"):
            while True:
                batch = source.next_batch()
                seen.update(batch.ids[batch.segments != -1].tolist())
        assert seen == expected, spec


# -- bad input: one line naming the source ------------------------------------------------------


def first_error(config: RunConfig) -> str:
    with pytest.raises(GptkitError) as e:
        pipeline(config).next_batch()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_source_with_no_documents_after_filtering(two_sources: tuple[Path, Path]) -> None:
    a, b = two_sources
    config = stream_config(f"[{{path: '{a}', filter: {{min_chars: 100000}}}}, '{b}']")
    assert first_error(config).startswith(f"source '{a}' has no documents after filtering")


@pytest.mark.parametrize("weights", [(0, 1), (-1, 1), (0, 0)])
def test_zero_negative_and_all_zero_weights(two_sources: tuple[Path, Path], weights: tuple[int, int]) -> None:
    a, b = two_sources
    with pytest.raises(GptkitError) as e:
        stream_config(f"[{{path: '{a}', weight: {weights[0]}}}, {{path: '{b}', weight: {weights[1]}}}]")
    assert f"source '{a}' has weight {weights[0]}; weights must be > 0" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_prepared_source_made_with_another_tokenizer(
    tmp_path: Path, two_sources: tuple[Path, Path]
) -> None:
    a, _ = two_sources
    chars = tmp_path / "chars"
    prepare([str(a)], chars, tokenizer="char", progress=False, workers=1)
    with pytest.raises(GptkitError, match=f"source '{chars}' was prepared with the char tokenizer") as e:
        stream_tokenizer(stream_config(f"['{a}', '{chars}']").data)
    assert "\n" not in str(e.value)
    gpt2 = tmp_path / "gpt2"
    prepare([str(a)], gpt2, tokenizer="gpt2", progress=False, workers=1)
    config = stream_config(f"['{chars}', '{gpt2}']", "data.tokenizer=char")
    with pytest.raises(GptkitError, match=f"data in {gpt2} was made with a different tokenizer") as e:
        pipeline(config)
    assert f"source '{gpt2}'" in str(e.value)


def corrupt_parquet(path: Path) -> None:
    """Three row groups of 40 rows; the second one's page header is overwritten."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = ["".join(random.Random(i).choice(WORDS_A) for _ in range(10)) for i in range(120)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=40)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    with path.open("r+b") as f:
        f.seek(start)
        f.write(b"\xff" * 24)


def test_a_corrupt_parquet_row_group_is_named_or_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "damaged.parquet"
    corrupt_parquet(path)
    message = first_error(stream_config(f"['{path}']"))
    assert message.startswith(f"source '{path}': {path} row group 1 (rows 41-80): cannot be read")
    config = stream_config(f"['{path}']", "data.skip_bad=true", "data.when_exhausted=renormalise")
    source, docs = pipeline(config, batch=1, block=16), 0
    with pytest.raises(GptkitError, match="every source ran out"):
        while True:
            source.next_batch()
    docs = source.packer.documents
    assert docs == 80 and source.skipped == 1


def test_skipped_rows_are_counted_once_through_a_stop_and_resume(tmp_path: Path) -> None:
    """Bad rows (not JSON, or without the text field) at known lines of a jsonl: first, throughout,
    and after the last document. A state counts the bad rows before its position, not those the
    tokenizing workers' read-ahead has met; resumed from it and read to the end, the count is the
    straight run's: the file's number of bad rows."""
    path = tmp_path / "bad.jsonl"
    rnd = random.Random(5)
    lines, bad = [], []
    for n in range(1, 601):
        if n % 37 == 1 or n > 598:
            lines.append("{not json" if n % 2 else json.dumps({"body": "no text"}))
            bad.append(n)
        else:
            text = "".join(rnd.choice(WORDS_A) for _ in range(rnd.randint(3, 30)))
            lines.append(json.dumps({"text": text}))
    path.write_text("\n".join(lines) + "\n")
    settings = ["data.skip_bad=true", "data.when_exhausted=renormalise", "data.shuffle_buffer=16"]
    config = stream_config(f"['{path}']", *settings, "data.workers=2", "data.pack=best_fit")

    def to_the_end(source: StreamBatches) -> int:
        with pytest.raises(GptkitError, match="every source ran out"):
            while True:
                source.next_batch()
        source.close()
        return source.skipped

    assert to_the_end(pipeline(config, batch=2, block=32)) == len(bad) == 19
    first = pipeline(config, batch=2, block=32)
    for _ in range(20):
        first.next_batch()
    state = first.state_dict()
    line = state["sources"][0]["position"]["at"][1]  # a jsonl position: [byte offset, line]
    assert 0 < state["skipped"] == sum(n <= line for n in bad) < first.sources[0].stream.skipped
    first.close()
    second = pipeline(config, batch=2, block=32)
    second.load_state_dict(state)
    assert to_the_end(second) == len(bad)


def test_a_missing_text_field(two_sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = two_sources
    message = first_error(stream_config(f"[{{path: '{a}', text_field: body}}]"))
    assert message.startswith(f"source '{a}': {a}:1: missing text field 'body' (fields: text)")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["some text"]}), table)
    message = first_error(stream_config(f"[{{path: '{table}', text_field: body}}]"))
    assert message.startswith(f"source '{table}': {table}: no column 'body' (columns: content)")


def test_prepare_mix_writes_the_streamed_documents_as_one_shard_set(
    tmp_path: Path, two_sources: tuple[Path, Path]
) -> None:
    """`gptkit prepare --mix CONFIG`: the documents a streamed run draws, in its order, split by hash;
    with when_exhausted=stop it ends when the first source runs out, so the shares hold."""
    from gptkit.api import prepare_mixture
    from gptkit.data.prepare import is_val
    from gptkit.data.shards import PreparedData

    a, b = two_sources
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(
        "data:\n  stream: true\n  when_exhausted: stop\n  shuffle_buffer: 32\n"
        f"  sources: [{{path: '{a}', weight: 0.5}}, {{path: '{b}', weight: 0.5}}]\ntrain: {{seed: 5}}\n"
    )
    meta = prepare_mixture(cfg, tmp_path / "out", val_fraction=0.1, workers=1)
    assert abs(meta["mixture"]["shares"][str(a)] - 0.5) < 0.02
    data = PreparedData.open(tmp_path / "out")
    config = load_config(cfg)
    source = pipeline(config, seed=5)
    want: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    n = 0
    while sum(len(d) for d in want["train"] + want["val"]) < data.tokens("train") + data.tokens("val"):
        doc = source.next_document()[1]
        want["val" if is_val(f"mix:{n}", 1337, 0.1) else "train"].append(doc)
        n += 1
    for split in ("train", "val"):
        assert (np.concatenate(data.shards(split)) == np.concatenate(want[split])).all()
    with pytest.raises(GptkitError, match="restart never runs out; give --tokens N"):
        prepare_mixture(cfg, tmp_path / "other", overrides=["data.when_exhausted=restart"])


def test_tokenizing_workers_do_not_change_the_batches(two_sources: tuple[Path, Path]) -> None:
    """The worker processes return documents in order: 1 (in process) and 2 workers give equal
    batches, so a run may resume with another data.workers."""
    a, b = two_sources
    sources = f"[{{path: '{a}', weight: 0.6}}, {{path: '{b}', weight: 0.4}}]"
    runs = []
    for workers in (1, 2):
        settings = ["data.shuffle_buffer=8", "data.pack=best_fit", f"data.workers={workers}"]
        config = stream_config(sources, *settings)
        source = pipeline(config, batch=2, block=64)
        runs.append([source.next_batch() for _ in range(30)])
        source.close()
    for x, y in zip(*runs, strict=True):
        assert (x.ids == y.ids).all() and (x.targets == y.targets).all() and (x.segments == y.segments).all()


# -- resume from where reading stands -----------------------------------------------------------


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory: pytest.TempPathFactory, two_sources: tuple[Path, Path]) -> dict[str, str]:
    """One source of each kind, about 300 documents each: jsonl, parquet (row groups of 64), a text
    folder (one file a document), a text file cut into pieces, a prepared folder, a saved `datasets`
    dataset."""
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    root = tmp_path_factory.mktemp("kinds")
    a, _ = two_sources
    texts = [json.loads(line)["text"] for line in a.read_text().splitlines()[:300]]
    (root / "one.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts}), root / "one.parquet", row_group_size=64)
    (root / "texts").mkdir()
    for i, t in enumerate(texts[:150]):
        (root / "texts" / f"{i:04d}.txt").write_text(t)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(root / "saved"))
    (root / "big.txt").write_text("\n".join(texts * 24))  # one file of about 128 pieces
    prepare([str(root / "one.jsonl")], root / "prepared", tokenizer="gpt2", progress=False, workers=1)
    return {
        "jsonl": str(root / "one.jsonl"),
        "parquet": str(root / "one.parquet"),
        "text": str(root / "texts"),
        "big_text": str(root / "big.txt"),
        "prepared": str(root / "prepared"),
        "hf": f"hf:{root / 'saved'}",
    }


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "text", "big_text", "prepared", "hf"])
def test_a_resumed_source_reads_nothing_before_its_position(every_kind: dict[str, str], kind: str) -> None:
    """The position after document k (a byte offset, row group and row, file, shard offset, iterator
    state): the reader resumed there yields document k + 1 first, having read nothing before it."""
    from gptkit.data.streams import DOCS_PER_TASK, DocumentStream

    config = stream_config(f"['{every_kind[kind]}']")
    tok = stream_tokenizer(config.data).tokenizer()
    whole = list(DocumentStream(config.data.stream_sources()[0], tok).epoch())
    assert len(whole) >= 100
    k = 70 if kind != "parquet" else 64 + 6  # the parquet position is inside the second row group
    stream = DocumentStream(config.data.stream_sources()[0], tok)
    resumed = stream.epoch(whole[k - 1][1])
    doc, position = next(resumed)
    assert np.array_equal(doc, whole[k][0]) and position == whole[k][1]
    ahead = 1 if kind == "prepared" else min(DOCS_PER_TASK, len(whole) - k)  # one tokenizing task
    assert stream.read == ahead, "no document before the position was read"
    rest = [doc, *(d for d, _ in resumed)]
    assert len(rest) == len(whole) - k
    assert all(np.array_equal(x, y) for x, (y, _) in zip(rest, whole[k:], strict=True))


def test_a_pipeline_resumed_from_its_state_gives_the_straight_batches_for_every_kind(
    every_kind: dict[str, str],
) -> None:
    sources = ", ".join(f"{{path: '{p}', weight: {i + 1}}}" for i, p in enumerate(every_kind.values()))
    config = stream_config(f"[{sources}]", "data.shuffle_buffer=16", "data.pack=best_fit")
    straight = pipeline(config, batch=2, block=32)
    expected = [straight.next_batch() for _ in range(60)]
    first = pipeline(config, batch=2, block=32)
    for _ in range(25):
        first.next_batch()
    state = first.state_dict()
    second = pipeline(config, batch=2, block=32)
    second.load_state_dict(state)
    for want in expected[25:]:
        got = second.next_batch()
        assert torch.equal(got.ids, want.ids) and torch.equal(got.targets, want.targets)
