"""Vector stores behind one interface: FAISS (exact inner product, or HNSW for large corpora) and
Qdrant in local mode (a folder, no server). Both are built whole from the index's vectors, so the
same vectors give the same top-k and scores in either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from gptkit.errors import GptkitError
from gptkit.rag.embedders import optional

STORES = ("faiss", "faiss-hnsw", "qdrant")
COLLECTION = "chunks"


class Store(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row ids) of the k best rows per query, best first; id -1 where fewer exist."""
        ...

    def close(self) -> None: ...


def build_store(kind: str, folder: Path, vectors: np.ndarray) -> None:
    """Write the store for `vectors` (row i is chunk i) into `folder`."""
    if kind in ("faiss", "faiss-hnsw"):
        faiss = optional("faiss", "faiss-cpu", "for --store faiss")
        dim = vectors.shape[1]
        if kind == "faiss":
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = 128
        if len(vectors):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        faiss.write_index(index, str(folder / "faiss.index"))
    elif kind == "qdrant":
        qdrant = optional("qdrant_client", "qdrant-client", "for --store qdrant")
        models = qdrant.models
        client = qdrant.QdrantClient(path=str(folder / "qdrant"))
        try:
            client.create_collection(
                COLLECTION,
                vectors_config=models.VectorParams(size=vectors.shape[1], distance=models.Distance.DOT),
            )
            for lo in range(0, len(vectors), 1024):
                rows = vectors[lo : lo + 1024]
                client.upsert(
                    COLLECTION,
                    points=models.Batch(ids=list(range(lo, lo + len(rows))), vectors=rows.tolist()),
                    wait=True,
                )
        finally:
            client.close()
    else:
        raise GptkitError(f"unknown store {kind!r}; use one of {', '.join(STORES)}")


def open_store(kind: str, folder: Path) -> Store:
    if kind in ("faiss", "faiss-hnsw"):
        return FaissStore(folder)
    if kind == "qdrant":
        return QdrantStore(folder)
    raise GptkitError(f"the index names an unknown store {kind!r}; rebuild it with gptkit rag index")


class FaissStore:
    SMALL = 64  # queries searched on one thread: OpenMP's start-up costs more than a small batch

    def __init__(self, folder: Path) -> None:
        self.faiss = optional("faiss", "faiss-cpu", "to read a faiss index")
        self.index = self.faiss.read_index(str(folder / "faiss.index"))
        self.threads = self.faiss.omp_get_max_threads()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.faiss.omp_set_num_threads(1 if len(queries) < self.SMALL else self.threads)
        try:
            scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        finally:
            self.faiss.omp_set_num_threads(self.threads)
        return scores, ids

    def close(self) -> None:
        pass


class QdrantStore:
    def __init__(self, folder: Path) -> None:
        qdrant = optional("qdrant_client", "qdrant-client", "to read a qdrant index")
        self.client = qdrant.QdrantClient(path=str(folder / "qdrant"))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, query in enumerate(queries):
            points = self.client.query_points(COLLECTION, query=query.tolist(), limit=k).points
            for col, point in enumerate(points):
                scores[row, col], ids[row, col] = point.score, int(point.id)
        return scores, ids

    def close(self) -> None:
        self.client.close()
