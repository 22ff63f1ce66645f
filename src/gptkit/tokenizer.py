"""Three tokenizers behind one interface: GPT-2 (tiktoken, offline), char-level, and trainable byte-level BPE.

A tokenizer is fully described by ``describe()`` (plain JSON), so token data and checkpoints can record which
tokenizer made them (``fingerprint()``) and ``from_description`` can rebuild it without any download.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any, ClassVar

import numpy as np
import tiktoken
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptkit.errors import GptkitError

EOT = "<|endoftext|>"

# GPT-2's original split pattern (tiktoken's r50k_base uses an equivalent, faster one).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT_ID = 50256
# sha256 of src/gptkit/assets/gpt2.tiktoken (= OpenAI's r50k_base ranks); a mismatch means a damaged install.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


class Tokenizer(ABC):
    """Text <-> token ids. ``encode`` treats a literal "<|endoftext|>" as plain text, so only the data
    pipeline (never user text) can insert the end-of-text id."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of valid ids, end-of-text included (ids are ``0..vocab_size-1``)."""

    @property
    @abstractmethod
    def eot_id(self) -> int:
        """Id of "<|endoftext|>", the document separator."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text; special-token strings in it are encoded as text."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Same result as ``[encode(t) for t in texts]``; callers parallelise across processes themselves."""
        return [self.encode(text) for text in texts]

    def encode_arrays(self, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
        """``encode_batch`` as numpy arrays, the data pipeline's form (kinds may skip Python ints)."""
        return [np.array(ids, dtype=dtype) for ids in self.encode_batch(texts)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of ``ids``; may end inside a multi-byte character (for streaming decoders)."""
        return self._decode_bytes(self._checked_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. half a character) becomes U+FFFD instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable, self-contained description; ``from_description`` rebuilds the tokenizer."""

    def fingerprint(self) -> str:
        """sha256 of the canonical description: equal fingerprints mean identical tokenization."""
        canonical = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    @abstractmethod
    def _decode_bytes(self, ids: list[int]) -> bytes: ...

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        """Ids as a list of ints (numpy/torch accepted), refusing ids this tokenizer does not have."""
        tolist = getattr(ids, "tolist", None)
        out = tolist() if callable(tolist) else list(ids)
        if out and (min(out) < 0 or max(out) >= self.vocab_size):
            bad = next(i for i in out if not 0 <= i < self.vocab_size)
            raise GptkitError(
                f"token id {bad} is outside the {self.kind} tokenizer's ids 0..{self.vocab_size - 1}; "
                "decode with the tokenizer the ids were made with (or mask logits beyond vocab_size)"
            )
        return out

    def __reduce__(self) -> tuple[Callable[..., Tokenizer], tuple[dict[str, Any]]]:
        # Pickle (e.g. to worker processes) as the small description, never as native tokenizer state.
        return from_description, (self.describe(),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# ---------------------------------------------------------------------------------------------- gpt2


@functools.cache
def _gpt2_encoding() -> tiktoken.Encoding:
    """Built once per process from the shipped ranks file: no network, no tiktoken cache dir."""
    data = resources.files("gptkit").joinpath("assets/gpt2.tiktoken").read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise GptkitError(
            "gptkit/assets/gpt2.tiktoken is damaged or replaced (sha256 mismatch); reinstall gptkit"
        )
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: GPT2_EOT_ID}
    )


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 byte-level BPE (50257 ids), identical ids to the original encoder.json/vocab.bpe."""

    kind = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eot_id(self) -> int:
        return GPT2_EOT_ID

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    # encode_batch is the base-class loop: encode_ordinary_batch(num_threads=1) measured ~1.5x slower.

    def encode_arrays(self, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
        """tiktoken's own buffer (``encode_to_numpy`` with no special tokens is ``encode_ordinary``):
        no list of Python ints is built, which takes 15-20% off the data pipeline's CPU time."""
        out = []
        for text in texts:
            ids = self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
            out.append(ids.astype(dtype, copy=False))
        return out

    def _decode_bytes(self, ids: list[int]) -> bytes:
        return self._enc.decode_bytes(ids)

    def describe(self) -> dict[str, Any]:
        return {"type": "gpt2", "ranks_sha256": GPT2_RANKS_SHA256}

    @classmethod
    def _from_description(cls, d: Mapping[str, Any]) -> GPT2Tokenizer:
        sha = _field(d, "ranks_sha256", str)
        if sha != GPT2_RANKS_SHA256:
            raise GptkitError(
                f"gpt2 tokenizer description names ranks file sha256 {sha[:12]}..., but this gptkit ships "
                f"{GPT2_RANKS_SHA256[:12]}...; re-tokenize the data with this version"
            )
        return cls()


def gpt2_tokenizer() -> GPT2Tokenizer:
    """The GPT-2 tokenizer (the encoding is built once per process and shared)."""
    return GPT2Tokenizer()


# ---------------------------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    """One id per character of the training text (sorted), then end-of-text: tiny vocab for toy corpora."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        """``chars``: distinct characters in sorted order (id = position); usually made by ``train``."""
        if not isinstance(chars, str) or list(chars) != sorted(set(chars)):
            raise GptkitError(
                "char tokenizer vocabulary must be a string of distinct characters in sorted order; "
                "build it with CharTokenizer.train"
            )
        self._chars = chars
        self._pieces = [*chars, EOT]
        # Codepoint -> id lookup over all of Unicode (4.4 MB): encode becomes one numpy gather.
        self._lookup = np.full(0x110000, -1, dtype=np.int32)
        self._lookup[_codepoints(chars)] = np.arange(len(chars), dtype=np.int32)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """Vocabulary = distinct characters of ``texts``, read one piece at a time."""
        seen: set[str] = set()
        for text in _texts(texts):
            seen.update(text)
        return cls("".join(sorted(seen)))

    @property
    def vocab_size(self) -> int:
        return len(self._chars) + 1

    @property
    def eot_id(self) -> int:
        return len(self._chars)

    def encode(self, text: str) -> list[int]:
        ids = self._lookup[_codepoints(text)]
        if ids.size and ids.min() < 0:
            char = text[int(np.argmax(ids < 0))]
            raise GptkitError(
                f"character {char!r} (U+{ord(char):04X}) is not in the char tokenizer's vocabulary: it only "
                "knows the characters of the text it was built from; rebuild it on text with it or use bpe"
            )
        return ids.tolist()

    def _decode_bytes(self, ids: list[int]) -> bytes:
        return "".join(map(self._pieces.__getitem__, ids)).encode("utf-8", errors="surrogatepass")

    def describe(self) -> dict[str, Any]:
        return {"type": "char", "chars": self._chars}

    @classmethod
    def _from_description(cls, d: Mapping[str, Any]) -> CharTokenizer:
        return cls(_field(d, "chars", str))


def _codepoints(text: str) -> np.ndarray:
    # surrogatepass: lone surrogates (from surrogateescape'd input) are characters too, not a crash.
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


# ----------------------------------------------------------------------------------------------- bpe


class HFTokenizer(Tokenizer):
    """A HuggingFace `tokenizers.Tokenizer` (`_hf`) with each id's bytes (`_pieces`) and end-of-text id
    (`_eot_id`), set by the subclass: encoding is HF's own, decoding joins the ids' bytes."""

    _hf: tokenizers.Tokenizer
    _pieces: list[bytes]
    _eot_id: int

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust-parallel; encode_batch_fast would be ~25% faster but needs tokenizers>=0.20.
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def _decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(map(self._pieces.__getitem__, ids))


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained on your corpus with HuggingFace ``tokenizers``: any text encodes losslessly."""

    kind = "bpe"

    def __init__(self, hf: tokenizers.Tokenizer) -> None:
        """Wrap a byte-level BPE ``tokenizers.Tokenizer`` with "<|endoftext|>"; usually made by ``train``."""
        self._json = hf.to_str()
        self._hf = hf
        hf.encode_special_tokens = True  # "<|endoftext|>" in text is text (not serialised by to_str)
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise GptkitError(f"bpe tokenizer has no {EOT} token; train it with gptkit's BPETokenizer.train")
        self._eot_id: int = eot
        self._pieces = _byte_level_pieces(hf)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on ``texts`` (streamed). The result has at most ``vocab_size`` ids (fewer if the text runs
        out of pairs to merge): 256 byte tokens, "<|endoftext|>" (id 0) and learned merges."""
        if vocab_size < 257:
            raise GptkitError(f"bpe vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(_texts(texts), trainer=trainer)
        return cls(hf)

    def describe(self) -> dict[str, Any]:
        return {"type": "bpe", "hf_json": self._json}

    @classmethod
    def _from_description(cls, d: Mapping[str, Any]) -> BPETokenizer:
        try:
            hf = tokenizers.Tokenizer.from_str(_field(d, "hf_json", str))
        except Exception as e:  # tokenizers raises plain Exception subclasses with multi-line text
            raise GptkitError(
                "bpe tokenizer description has an invalid 'hf_json'; recreate it with describe()"
            ) from e
        return cls(hf)


class SentencePieceTokenizer(HFTokenizer):
    """A HuggingFace `tokenizers` BPE in SentencePiece's style, as Llama, Mistral and TinyLlama ship it:
    spaces spelled "▁", characters outside the vocabulary as byte pieces <0xNN> (byte fallback), and
    the model's end-of-sequence token (e.g. "</s>") as end-of-text.

    Encoding is HF's own (its normalizer puts "▁" before the text, as SentencePiece does). Decoding
    joins each id's bytes ("▁" -> space, <0xNN> -> that byte, special tokens -> their text), so that
    a stream may stop inside a character; a decoded text therefore starts with the space that
    encoding added, where HF's decoder strips it.
    """

    kind = "sentencepiece"

    def __init__(self, hf: tokenizers.Tokenizer, eos: str) -> None:
        self._json, self._eos = hf.to_str(), eos
        self._hf = hf
        hf.encode_special_tokens = True  # "</s>" in text is text
        eot = hf.token_to_id(eos)
        if eot is None:
            raise GptkitError(f"the sentencepiece tokenizer has no end-of-sequence token {eos!r}")
        self._eot_id: int = eot
        added = hf.get_added_tokens_decoder()
        pieces = []
        for i in range(hf.get_vocab_size(with_added_tokens=True)):
            token = hf.id_to_token(i)
            if token is None:
                raise GptkitError(f"the sentencepiece tokenizer's ids are not 0..n-1 (id {i} is missing)")
            byte = BYTE_PIECE.fullmatch(token)
            if byte:
                pieces.append(bytes([int(byte.group(1), 16)]))
            elif i in added:
                pieces.append(added[i].content.encode("utf-8"))
            else:
                pieces.append(token.replace("\u2581", " ").encode("utf-8"))
        self._pieces = pieces

    def describe(self) -> dict[str, Any]:
        return {"type": "sentencepiece", "hf_json": self._json, "eos": self._eos}

    @classmethod
    def _from_description(cls, d: Mapping[str, Any]) -> SentencePieceTokenizer:
        try:
            hf = tokenizers.Tokenizer.from_str(_field(d, "hf_json", str))
        except Exception as e:  # tokenizers raises plain Exception subclasses with multi-line text
            raise GptkitError(
                "sentencepiece tokenizer description has an invalid 'hf_json'; recreate it with describe()"
            ) from e
        return cls(hf, _field(d, "eos", str))


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level vocabularies spell each byte as a printable char."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _byte_level_pieces(hf: tokenizers.Tokenizer) -> list[bytes]:
    """Raw bytes of every id, so decode_bytes can return incomplete characters (HF decode cannot)."""
    to_byte = _unicode_to_byte()
    added = hf.get_added_tokens_decoder()
    pieces = []
    for i in range(hf.get_vocab_size(with_added_tokens=True)):
        token = hf.id_to_token(i)
        if i in added:
            pieces.append(added[i].content.encode("utf-8"))
        elif token is None or not set(token) <= to_byte.keys():
            raise GptkitError(f"bpe tokenizer is not a byte-level BPE with ids 0..n-1 (id {i}: {token!r})")
        else:
            pieces.append(bytes(to_byte[c] for c in token))
    return pieces


# ------------------------------------------------------------------------------------- description


def _texts(texts: Iterable[str]) -> Iterable[str]:
    # A lone string is one text, not an iterable of one-character texts.
    return [texts] if isinstance(texts, str) else texts


def _field(d: Mapping[str, Any], key: str, kind: type) -> Any:
    value = d.get(key)
    if not isinstance(value, kind):
        raise GptkitError(
            f"{d.get('type')} tokenizer description lacks a valid {key!r} ({kind.__name__}); "
            "recreate it with Tokenizer.describe()"
        )
    return value


_FROM_DESCRIPTION: dict[str, Callable[[Mapping[str, Any]], Tokenizer]] = {
    "gpt2": GPT2Tokenizer._from_description,
    "char": CharTokenizer._from_description,
    "bpe": BPETokenizer._from_description,
    "sentencepiece": SentencePieceTokenizer._from_description,
}


def from_description(d: Mapping[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer ``describe()`` described (offline); GptkitError if the description is invalid."""
    kind = d.get("type") if isinstance(d, Mapping) else None
    build = _FROM_DESCRIPTION.get(kind) if isinstance(kind, str) else None
    if build is None:
        raise GptkitError(
            f"unknown tokenizer description type {kind!r}; expected one of {', '.join(_FROM_DESCRIPTION)} "
            "(made by Tokenizer.describe())"
        )
    return build(d)
