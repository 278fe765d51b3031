"""FAISS item index over real 64-bit item ids (IndexIDMap2) with inner-product metric.

FAISS ids are int64; uint64 ids travel as the same 64 bits viewed as int64. A FAISS index
must not be searched while it changes, so searches and online upserts share a lock.
"""

import logging
import math
import threading
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

FLAT_MAX_ITEMS = 50_000  # exact search stays fast enough below this many items


def default_factory(n_items: int) -> str:
    if n_items <= FLAT_MAX_ITEMS:
        return "IDMap2,Flat"
    nlist = 1 << int(round(math.log2(4 * math.sqrt(n_items))))
    return f"IDMap2,IVF{nlist},Flat"


class ItemIndex:
    def __init__(self, index: faiss.Index, nprobe: int = 32):
        self.index = index
        self.set_nprobe(nprobe)
        self._lock = threading.Lock()

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, factory: str = "auto", nprobe: int = 32, seed: int = 0) -> "ItemIndex":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        factory = default_factory(len(ids)) if factory == "auto" else factory
        if not factory.startswith("IDMap"):
            factory = "IDMap2," + factory
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = seed
            log.info("training %s on %d vectors", factory, len(vectors))
            index.train(vectors)
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.uint64).view(np.int64))
        return cls(index, nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        try:
            faiss.extract_index_ivf(self.index).nprobe = nprobe
        except RuntimeError:
            pass  # not an IVF index: nothing to probe

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, uint64 ids) per query; rows padded with id 0 / -inf past ntotal."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            scores, ids = self.index.search(queries, max(1, min(k, len(self))))
        valid = ids != -1
        return np.where(valid, scores, -np.inf), np.where(valid, ids, 0).view(np.uint64)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        with self._lock:
            return self.index.reconstruct_batch(np.asarray(ids, dtype=np.uint64).view(np.int64))

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace items' vectors; returns how many ids were new to the index."""
        keys = np.ascontiguousarray(np.asarray(ids, dtype=np.uint64).view(np.int64))
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            replaced = self.index.remove_ids(faiss.IDSelectorBatch(keys))
            self.index.add_with_ids(vectors, keys)
        return len(keys) - replaced

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, nprobe: int = 32) -> "ItemIndex":
        return cls(faiss.read_index(str(path)), nprobe)
