"""Retrieval-augmented generation: index documents, retrieve passages, compose them into prompts.

`gptkit.rag.index(docs, out)` builds an index folder; `gptkit.rag.Retriever(out).search(q, k)` reads
it. Names are imported on first use, so that `import gptkit.rag` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptkit.rag.chunking import Hit
    from gptkit.rag.indexing import IndexReport
    from gptkit.rag.indexing import build_index as index
    from gptkit.rag.retriever import Retriever

_HOMES = {"index": ("indexing", "build_index"), "IndexReport": ("indexing", "IndexReport"),
          "Retriever": ("retriever", "Retriever"), "Hit": ("chunking", "Hit")}  # fmt: skip

__all__ = ["Hit", "IndexReport", "Retriever", "index"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'gptkit.rag' has no attribute {name!r}")
    module, attr = _HOMES[name]
    return getattr(importlib.import_module(f"gptkit.rag.{module}"), attr)
