"""`gptkit prepare --mix CONFIG`: the streamed mixture of a config's `data.sources`, written once as
one prepared shard set, for users who prefer preparing to streaming.

The documents are those a streamed run draws (the same readers, shuffle buffers, weights and seed),
in that order; each goes to val by the seeded hash `prepare` uses, keyed by its place in the
mixture. The set ends at `--tokens`, when a source runs out (`when_exhausted: stop`, so the shares
hold), or when every source is spent (`renormalise`). Output is crash-safe as `prepare`'s is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from gptkit.config import DataConfig, PrepareConfig
from gptkit.console import notice
from gptkit.data import prepare
from gptkit.data.mixing import SourceExhausted, StreamBatches
from gptkit.data.shards import SPLITS, token_dtype
from gptkit.data.streams import stream_tokenizer
from gptkit.errors import GptkitError, os_error
from gptkit.files import write_atomic
from gptkit.locks import hold


def prepare_mixture(
    data: DataConfig,
    out: Path,
    config: PrepareConfig,
    mix_seed: int,
    max_tokens: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the mixture of `data.sources` to `out`; returns the meta dict (with a `mixture` entry)."""
    if data.when_exhausted == "restart" and max_tokens is None:
        raise GptkitError(
            "data.when_exhausted=restart never runs out; give --tokens N, or set data.when_exhausted to "
            "stop (end at the first exhausted source) or renormalise (use everything)"
        )
    tokenizer = stream_tokenizer(data).tokenizer()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(hold(out, f"output folder {str(out)!r}"))
        except OSError as e:
            raise os_error(e, "write") from None
        prepare._finish_interrupted_swap(out)
        final = prepare._check_output(out, overwrite, [])
        pipeline = StreamBatches(data, tokenizer, 1, 1, mix_seed, skip_bad=config.skip_bad)
        dtype = token_dtype(tokenizer.vocab_size)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        prepare._remove_stale_partials(out)
        tmp.mkdir(parents=True)
        try:
            writers = {s: prepare.ShardWriter(tmp, s, dtype, config.shard_tokens) for s in SPLITS}
            written = n = 0
            while max_tokens is None or written < max_tokens:
                try:
                    drawn = pipeline.next_document()
                except SourceExhausted:
                    break
                if drawn is None:
                    break
                source, doc = drawn
                split = "val" if prepare.is_val(f"mix:{n}", config.seed, config.val_fraction) else "train"
                writers[split].write(doc.astype(dtype), 1)
                written, n = written + len(doc), n + 1
            pipeline.close()
            splits = {s: w.close() for s, w in writers.items()}
            if splits["train"]["tokens"] == 0:
                raise GptkitError("the mixture gave no train tokens; add data, or lower --val-fraction")
            meta = prepare._meta(tokenizer, dtype, splits, [], config, pipeline.skip_log())
            meta["sources"] = [{"source": c.path, "weight": c.weight} for c in data.stream_sources()]
            meta["mixture"] = {
                "seed": mix_seed,
                "shares": pipeline.shares(),
                "data": data.model_dump(mode="json"),
            }
            if tokenizer.kind == "bpe":
                (tmp / "tokenizer.json").write_text(tokenizer.describe()["hf_json"], encoding="utf-8")
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=1) + "\n", durable=True)
            prepare._publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shares = ", ".join(f"{name} {share:.1%}" for name, share in pipeline.shares().items())
    notice(f"token shares: {shares}")
    prepare._report(meta, pipeline.skip_log(), final)
    return meta
