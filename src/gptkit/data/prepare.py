"""`gptkit prepare`: text sources → token shards + meta.json, streamed and in parallel.

The pipeline: sources stream pieces (documents or chunks of large files); each piece is put in
train or val by a seeded hash of its key; batches of pieces go to worker processes that
tokenize them; the main process appends the tokens to bounded shard files. At most a few
batches are in flight, so memory stays flat however large the corpus is.

Everything is written to a hidden `.NAME.partial-PID` folder beside the output and renamed into
place only when complete (meta.json last), so an interrupted run leaves nothing that a later run
or a loader would take for finished output.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from gptkit.config import MODEL_TOKENIZER, PrepareConfig
from gptkit.console import notice
from gptkit.data.shards import FORMAT, FORMAT_VERSION, SPLITS, shard_name, token_dtype
from gptkit.data.sources import Piece, SkipLog, Source, resolve_sources
from gptkit.errors import GptkitError, os_error
from gptkit.files import fsync_dir, left_by_dead, remove_dead_partials, write_atomic
from gptkit.locks import alive, hold
from gptkit.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    from_description,
    gpt2_tokenizer,
)
from gptkit.version import __version__

BATCH_CHARS = 1 << 20  # characters sent to a worker at a time
INFLIGHT_PER_WORKER = 3  # batches queued per worker: enough to keep it busy, bounded memory

Batch = tuple[list[str], list[bool], list[bool]]  # texts, ends-of-document, is-val


def prepare_data(
    specs: list[str],
    out: Path,
    config: PrepareConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Prepare `specs` into `out`, which this process holds the lock of from the first check to the
    last rename: a second `prepare` into it is refused, naming this one. `tokenizer`: a model's own
    (config.tokenizer "model:PATH", loaded by the caller), used as it is."""
    sources = resolve_sources(specs)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(hold(out, f"output folder {str(out)!r}"))
        except OSError as e:
            raise os_error(e, "write") from None
        return _prepare(sources, out, config, overwrite, progress, tokenizer)


def _prepare(
    sources: list[Source],
    out: Path,
    config: PrepareConfig,
    overwrite: bool,
    progress: bool,
    given: Tokenizer | None,
) -> dict[str, Any]:
    _finish_interrupted_swap(out)
    final = _check_output(out, overwrite, sources)
    skips = SkipLog(config.skip_bad)
    tokenizer = given or _build_tokenizer(sources, config, skips, progress)
    dtype = token_dtype(tokenizer.vocab_size)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove_stale_partials(out)
    tmp.mkdir(parents=True)
    try:
        writers = {split: ShardWriter(tmp, split, dtype, config.shard_tokens) for split in SPLITS}
        skips = SkipLog(config.skip_bad)  # count again: the tokenizer pass saw the same documents
        pieces = _split_pieces(sources, config, skips)
        batches = _batches(pieces)
        with tqdm(desc="prepare", unit="tok", unit_scale=True, disable=not progress, smoothing=0.1) as bar:
            for train, val, n_train, n_val in _tokenize(batches, tokenizer, dtype, config.workers):
                writers["train"].write(train, n_train)
                writers["val"].write(val, n_val)
                bar.update(len(train) + len(val))
                bar.set_postfix(docs=writers["train"].documents + writers["val"].documents, refresh=False)
        splits = {split: w.close() for split, w in writers.items()}
        _check_nonempty(splits, sources)
        meta = _meta(tokenizer, dtype, splits, sources, config, skips)
        hf_json = tokenizer.describe().get("hf_json")
        if hf_json is not None:  # bpe, sentencepiece: HF's own file beside the data
            (tmp / "tokenizer.json").write_text(hf_json, encoding="utf-8")
        write_atomic(tmp / "meta.json", json.dumps(meta, indent=1) + "\n", durable=True)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(meta, skips, final)
    return meta


# ---------------------------------------------------------------------------------------------
# Output folder


def _check_output(out: Path, overwrite: bool, sources: list[Source]) -> Path:
    """`out` is replaced only when it holds nothing, or prepared data gptkit wrote and nothing else,
    and never when it holds one of the sources."""
    if out.exists() and not out.is_dir():
        raise GptkitError(f"output {str(out)!r} is a file; choose a folder with --out")
    for src in sources:
        if src.path is not None and _inside(src.path, out):
            raise GptkitError(
                f"source {src.spec!r} is inside --out {str(out)!r}, which the output replaces; "
                "choose another --out (nothing was deleted)"
            )
    if out.is_dir() and any(out.iterdir()):
        ours = _own_files(out)
        if ours is None:
            raise GptkitError(
                f"output folder {str(out)!r} is not empty and holds no prepared data; "
                "choose another --out (nothing was deleted)"
            )
        foreign = sorted(
            p.relative_to(out).as_posix()
            for p in out.rglob("*")
            if not p.is_dir() and p.relative_to(out).as_posix() not in ours
        )
        if foreign:
            more = " ..." if len(foreign) > 3 else ""
            raise GptkitError(
                f"output folder {str(out)!r} holds files gptkit did not write there "
                f"({', '.join(foreign[:3])}{more}); move them away or choose another --out "
                "(nothing was deleted)"
            )
        if not overwrite:
            raise GptkitError(f"{str(out)!r} already holds prepared data; pass --overwrite to replace it")
    return out


def _inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies inside it (as written, or once links are resolved)."""
    for p, f in ((path.absolute(), folder.absolute()), (path.resolve(), folder.resolve())):
        if p == f or f in p.parents:
            return True
    return False


def _own_files(out: Path) -> set[str] | None:
    """The files a gptkit meta.json in `out` says it wrote there; None if it holds no such meta.json."""
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        shards = [s["file"] for split in SPLITS for s in meta["splits"][split]["shards"]]
        if meta.get("format") != FORMAT or not all(isinstance(f, str) for f in shards):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"meta.json", "tokenizer.json", *shards}


def _remove_stale_partials(out: Path) -> None:
    """Remove what killed runs left behind (their process is gone), saying so."""
    for stale in remove_dead_partials(out):
        notice(f"removed {stale}, left by an interrupted prepare")


def _replaced(final: Path, pid: int) -> Path:
    """Where `_publish` of process `pid` keeps the folder it replaces until the new one is in place."""
    return final.parent / f".{final.name}.old-{pid}"


def _finish_interrupted_swap(out: Path) -> None:
    """A prepare killed inside `_publish` left the data it was replacing in `.OUT.old-PID`: put it
    back if `out` is missing (the new data never arrived), else delete it (the swap was done)."""
    for old in left_by_dead(out, "old"):
        if out.exists() or out.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
            notice(f"removed {old}, the data an interrupted prepare had already replaced")
        else:
            old.rename(out)
            notice(f"restored {out} from {old}, where an interrupted prepare had moved it")


def _publish(tmp: Path, final: Path) -> None:
    """Swap the finished folder into place; an old one is only deleted after the swap (a kill in
    between leaves it in `_replaced`, which the next prepare puts back or removes)."""
    old = None
    if final.exists():
        old = _replaced(final, os.getpid())
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Appends tokens of one split to shard files of at most `shard_tokens` tokens, each with the
    sha256 of its bytes (computed as they are written: no second read)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._file: BinaryIO | None = None
        self._digest = hashlib.sha256()

    def write(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            assert self._file is not None
            data = part.tobytes()
            self._file.write(data)
            self._digest.update(data)
            self.shards[-1]["tokens"] += len(part)

    def _open_next(self) -> None:
        self._close_file()
        name = shard_name(self.split, len(self.shards))
        self._file = (self.folder / name).open("wb")
        self._digest = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self.shards[-1]["sha256"] = self._digest.hexdigest()

    def close(self) -> dict[str, Any]:
        self._close_file()
        tokens = sum(s["tokens"] for s in self.shards)
        return {"tokens": tokens, "documents": self.documents, "shards": self.shards}


# ---------------------------------------------------------------------------------------------
# Splitting, batching, tokenizing


def is_val(key: str, seed: int, val_fraction: float) -> bool:
    """Seeded, order-independent split: the same piece lands in the same split every run."""
    h = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < val_fraction


def _all_pieces(sources: list[Source], config: PrepareConfig, skips: SkipLog) -> Iterator[Piece]:
    for src in sources:
        yield from src.pieces(config.text_field, skips)


def _split_pieces(
    sources: list[Source], config: PrepareConfig, skips: SkipLog
) -> Iterator[tuple[Piece, bool]]:
    for piece in _all_pieces(sources, config, skips):
        yield piece, is_val(piece.key, config.seed, config.val_fraction)


def _batches(pieces: Iterable[tuple[Piece, bool]]) -> Iterator[Batch]:
    texts: list[str] = []
    lasts: list[bool] = []
    vals: list[bool] = []
    size = 0
    for piece, val in pieces:
        texts.append(piece.text)
        lasts.append(piece.last)
        vals.append(val)
        size += len(piece.text)
        if size >= BATCH_CHARS:
            yield texts, lasts, vals
            texts, lasts, vals, size = [], [], [], 0
    if texts:
        yield texts, lasts, vals


_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(description: dict[str, Any], dtype: str, parent: int | None = None) -> None:
    global _worker_tokenizer, _worker_dtype
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process, one core
    _worker_tokenizer = from_description(description)
    _worker_dtype = np.dtype(dtype)
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A worker outlives a killed `prepare` (it would wait for work forever): leave when it is gone."""
    while alive(parent):
        time.sleep(1.0)
    os._exit(1)


def _encode_batch(batch: Batch) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Tokenize a batch into one train and one val array, with end-of-text after each document."""
    assert _worker_tokenizer is not None and _worker_dtype is not None
    texts, lasts, vals = batch
    arrays = _worker_tokenizer.encode_arrays(texts, _worker_dtype)
    eot = np.array([_worker_tokenizer.eot_id], dtype=_worker_dtype)
    out = []
    for want_val in (False, True):
        parts: list[np.ndarray] = []
        for ids, last, val in zip(arrays, lasts, vals, strict=True):
            if val == want_val:
                parts.append(ids)
                if last:
                    parts.append(eot)
        out.append(
            np.concatenate(parts, dtype=_worker_dtype, casting="same_kind")
            if parts
            else np.empty(0, _worker_dtype)
        )
    n_val = sum(vals)
    return out[0], out[1], len(vals) - n_val, n_val


@contextlib.contextmanager
def _main_importable() -> Iterator[None]:
    """Workers re-run the parent's `__main__` from its file; a script piped into `python -` has the
    file name "<stdin>", which they cannot open (the pool breaks). Hide such a name while they run."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if path is None or os.path.isfile(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _tokenize(
    batches: Iterator[Batch], tokenizer: Tokenizer, dtype: np.dtype, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """Results in input order; at most a few batches per worker in flight."""
    init_args = (tokenizer.describe(), dtype.str)
    if workers == 1:
        _init_worker(*init_args)
        yield from map(_encode_batch, batches)
        return
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        # Workers then fork from a server that imported this module (numpy, tiktoken, tokenizers,
        # pydantic) once, instead of each importing it (~0.5 s of CPU per worker). No effect if this
        # process already started its forkserver; "__main__" is multiprocessing's default preload.
        ctx.set_forkserver_preload(["__main__", __name__])
    init_args = (*init_args, os.getpid())
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init_args)
    with _main_importable(), pool:
        inflight: deque[Future[tuple[np.ndarray, np.ndarray, int, int]]] = deque()
        try:
            for batch in batches:
                inflight.append(pool.submit(_encode_batch, batch))
                if len(inflight) >= workers * INFLIGHT_PER_WORKER:
                    yield inflight.popleft().result()
            while inflight:
                yield inflight.popleft().result()
        except BaseException:
            for f in inflight:
                f.cancel()
            raise


# ---------------------------------------------------------------------------------------------
# Tokenizer, checks and report


def _build_tokenizer(
    sources: list[Source], config: PrepareConfig, skips: SkipLog, progress: bool
) -> Tokenizer:
    """gpt2 is fixed; char and bpe are built from the text first (a streaming pass)."""
    if config.tokenizer.startswith(MODEL_TOKENIZER):
        raise GptkitError(
            f"--tokenizer {config.tokenizer}: load the model's tokenizer and pass it to prepare_data"
        )
    if config.tokenizer == "gpt2":
        return gpt2_tokenizer()
    once = next((s for s in sources if s.once), None)
    if once is not None:
        raise GptkitError(
            f"source {once.spec!r} is a pipe or device, which can be read only once, and the "
            f"{config.tokenizer} tokenizer reads its sources twice; save it to a file first, or use "
            "--tokenizer gpt2"
        )
    if config.tokenizer == "char":
        notice("building the character vocabulary (first pass over the text)")
        return CharTokenizer.train(p.text for p in _all_pieces(sources, config, skips))
    notice(f"training a byte-level BPE tokenizer of {config.vocab_size} tokens on the train split")
    train_texts = (
        p.text for p, val in _split_pieces(sources, config, skips) if not val or config.val_fraction == 0
    )
    assert config.vocab_size is not None
    return BPETokenizer.train(train_texts, config.vocab_size)


def _check_nonempty(splits: dict[str, dict[str, Any]], sources: list[Source]) -> None:
    if splits["train"]["documents"] + splits["val"]["documents"] == 0:
        names = ", ".join(s.spec for s in sources[:3])
        raise GptkitError(f"no text found in {names}; check the files, or --text-field for .jsonl/.parquet")
    if splits["train"]["tokens"] == 0:
        raise GptkitError("every document fell in the val split; lower --val-fraction or add more documents")


def _meta(
    tokenizer: Tokenizer,
    dtype: np.dtype,
    splits: dict[str, dict[str, Any]],
    sources: list[Source],
    config: PrepareConfig,
    skips: SkipLog,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gptkit_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": tokenizer.describe(),
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "splits": splits,
        "sources": [s.record() for s in sources],
        "settings": config.model_dump(mode="json"),
        "skipped": {"documents": skips.count, "examples": skips.examples},
    }


def _report(meta: dict[str, Any], skips: SkipLog, out: Path) -> None:
    parts = [
        f"{s}: {meta['splits'][s]['tokens']:,} tokens in {meta['splits'][s]['documents']:,} documents"
        for s in SPLITS
    ]
    notice(f"wrote {out} ({'; '.join(parts)}; tokenizer {meta['tokenizer']['type']}, {meta['dtype']})")
    if meta["splits"]["val"]["tokens"] == 0 and meta["settings"]["val_fraction"] > 0:
        notice("the val split is empty: too few documents for --val-fraction; add data or raise it")
    if skips.count:
        notice(f"skipped {skips.count} bad documents, e.g. {skips.examples[0]}")
