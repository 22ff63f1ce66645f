"""The prepared-data format: a folder of raw token shards plus `meta.json`, and its reader.

Layout of `DIR/`:
  meta.json            written last: its presence means the folder is complete
  train_000000.bin ... flat little-endian uint16 (uint32 when the vocabulary exceeds 65,535)
  val_000000.bin  ...  tokens, read with np.memmap; documents end with the end-of-text token
  tokenizer.json       (bpe only) the trained tokenizer, also embedded in meta.json

The reader trusts nothing: it checks the format, the tokenizer and every shard's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.errors import GptkitError
from gptkit.tokenizer import Tokenizer, from_description

FORMAT = "gptkit-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


@dataclass
class PreparedData:
    """A verified prepared-data folder."""

    path: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> PreparedData:
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            partial = sorted(path.parent.glob(f".{path.name}.partial-*")) if path.parent.exists() else []
            why = " (an interrupted prepare left " + str(partial[0]) + ")" if partial else ""
            raise GptkitError(
                f"{str(path)!r} is not prepared data: no meta.json{why}; "
                f"run: gptkit prepare [SOURCE ...] --out {path}"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise GptkitError(f"{meta_path} is corrupt (not JSON); prepare the data again") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise GptkitError(
                f"{meta_path} is not gptkit-shards version {FORMAT_VERSION}; prepare the data again"
            )
        data = cls(path, meta)
        data._check_shards()
        return data

    def _check_shards(self) -> None:
        itemsize = self.dtype.itemsize
        for split in SPLITS:
            for shard in self.meta["splits"][split]["shards"]:
                file = self.path / shard["file"]
                expected = shard["tokens"] * itemsize
                if not file.is_file():
                    raise GptkitError(f"shard {file} is missing; prepare the data again")
                if file.stat().st_size != expected:
                    raise GptkitError(
                        f"shard {file} has {file.stat().st_size} bytes, meta.json says {expected}; "
                        "it is damaged: prepare the data again"
                    )

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self) -> Tokenizer:
        return from_description(self.meta["tokenizer"])

    def tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def shards(self, split: str) -> list[np.memmap]:
        """Read-only memory maps of a split's shards, in order (no token is loaded until read)."""
        if split not in SPLITS:
            raise GptkitError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return [
            np.memmap(self.path / s["file"], dtype=self.dtype, mode="r")
            for s in self.meta["splits"][split]["shards"]
            if s["tokens"] > 0
        ]

    def check_tokenizer(self, fingerprint: str, what: str = "the model") -> None:
        """Training on data made by another tokenizer would be silent garbage: refuse it."""
        if self.meta["tokenizer_fingerprint"] != fingerprint:
            kind = self.meta["tokenizer"].get("type", "?")
            raise GptkitError(
                f"data in {self.path} was made with a different tokenizer ({kind}) than {what}; "
                "prepare the data with the same tokenizer or train a new model on this data"
            )
