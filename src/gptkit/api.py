"""The Python API: every CLI command is a thin layer over one of these functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def prepare(
    sources: list[str] | None = None,
    out: str | Path = "data/default",
    *,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Tokenize text sources into token shards plus meta.json; returns the meta dict.

    `sources` are text files, folders, .jsonl/.parquet files or `hf:NAME` datasets; none means the
    built-in default corpus (Python's documentation). `settings` are `PrepareConfig` fields.
    """
    from gptkit.config import PrepareConfig, validate
    from gptkit.data.prepare import prepare_data

    config = validate(PrepareConfig, settings, "prepare settings")
    return prepare_data(sources or [], Path(out), config, overwrite=overwrite, progress=progress)


def info(target: str) -> dict[str, Any]:
    """Describe a preset, config file, prepared data folder, run folder or checkpoint."""
    from gptkit.describe import describe

    return describe(target)
