"""The prepared-data format: a folder of raw token shards plus `meta.json`, and its reader.

Layout of `DIR/`:
  meta.json            written last: its presence means the folder is complete
  train_000000.bin ... flat little-endian uint16 (uint32 when the vocabulary exceeds 65,535)
  val_000000.bin  ...  tokens, read with np.memmap; documents end with the end-of-text token
  tokenizer.json       (bpe only) the trained tokenizer, also embedded in meta.json

Each shard's entry in meta.json holds its token count and the sha256 of its bytes (folders
prepared before gptkit recorded it have none, and load unchecked).

The reader trusts nothing: it checks the format, the tokenizer against the vocabulary size, every
shard's size, each split's total, and the shards' sha256 when that is cheap (at most
VERIFY_ON_OPEN_BYTES of shards; `gptkit info DATA --verify` checks any size). Batches check their
token ids against the vocabulary (data.batches), which finds what the sizes cannot.
"""

from __future__ import annotations

import hashlib
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
VERIFY_ON_OPEN_BYTES = 256 * 2**20  # hashed at ~1.7 GB/s: a sixth of a second
HASH_CHUNK = 16 * 2**20


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
    def open(cls, path: str | Path, verify: bool | None = None) -> PreparedData:
        """Open and check a folder; `verify` hashes every shard (None: when they are small)."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            left = (
                sorted(path.parent.glob(f".{path.name}.partial-*"))
                + sorted(path.parent.glob(f".{path.name}.old-*"))
                if path.parent.exists()
                else []
            )
            why = " (an interrupted prepare left " + str(left[0]) + ")" if left else ""
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
        try:
            data._check_meta()
            data._check_shards()
        except (KeyError, TypeError, ValueError) as e:
            raise GptkitError(
                f"{meta_path} is damaged ({type(e).__name__}: {e}); prepare the data again"
            ) from None
        if verify or (verify is None and data.shard_bytes() <= VERIFY_ON_OPEN_BYTES):
            data.verify()
        return data

    def _check_meta(self) -> None:
        """The vocabulary size against the tokenizer it describes: an edited meta.json would
        otherwise size the model wrongly and fail deep inside torch."""
        tokenizer = self.tokenizer()
        if self.vocab_size != tokenizer.vocab_size or token_dtype(self.vocab_size) != self.dtype:
            raise GptkitError(
                f"{self.path / 'meta.json'} says vocab_size {self.meta['vocab_size']} and dtype "
                f"{self.meta['dtype']}, but its tokenizer has {tokenizer.vocab_size} ids; meta.json was "
                "edited or is damaged: prepare the data again"
            )

    def _check_shards(self) -> None:
        itemsize = self.dtype.itemsize
        for split in SPLITS:
            entry = self.meta["splits"][split]
            if sum(int(s["tokens"]) for s in entry["shards"]) != int(entry["tokens"]):
                raise GptkitError(
                    f"{self.path / 'meta.json'} says the {split} split has {entry['tokens']} tokens, but "
                    f"its shards hold {sum(int(s['tokens']) for s in entry['shards'])}; meta.json was "
                    "edited or is damaged: prepare the data again"
                )
            for shard in entry["shards"]:
                file = self.path / shard["file"]
                expected = shard["tokens"] * itemsize
                if not file.is_file():
                    raise GptkitError(f"shard {file} is missing; prepare the data again")
                if file.stat().st_size != expected:
                    raise GptkitError(
                        f"shard {file} has {file.stat().st_size} bytes, meta.json says {expected}; "
                        "it is damaged: prepare the data again"
                    )

    def shard_bytes(self) -> int:
        return sum(int(s["tokens"]) for split in SPLITS for s in self.meta["splits"][split]["shards"]) * (
            self.dtype.itemsize
        )

    def verify(self) -> int:
        """Check every shard against the sha256 meta.json records; returns how many were checked
        (folders prepared before gptkit recorded them have none)."""
        checked = 0
        for split in SPLITS:
            for shard in self.meta["splits"][split]["shards"]:
                if "sha256" not in shard:
                    continue
                file = self.path / shard["file"]
                digest = hashlib.sha256()
                with file.open("rb") as f:
                    while chunk := f.read(HASH_CHUNK):
                        digest.update(chunk)
                if digest.hexdigest() != shard["sha256"]:
                    raise GptkitError(
                        f"shard {file} fails its content check (its sha256 differs from the one in "
                        "meta.json: it changed after it was written); prepare the data again"
                    )
                checked += 1
        return checked

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
