"""Shared fixtures: the real public data beside the project root (../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPTKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """Path of a file in ../shared/data, or skip the test naming what is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (real test data lives in ../shared/data beside the project root)")
    return path


@pytest.fixture
def shakespeare() -> Path:
    return shared_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus prepared with the char tokenizer, once per test session (tests only read it)."""
    from gptkit.api import prepare

    out = tmp_path_factory.mktemp("data") / "pydoc"
    prepare([], out, tokenizer="char", progress=False, workers=1)
    return out
