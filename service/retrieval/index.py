"""FAISS item index over real 64-bit item ids (IndexIDMap2) with inner-product metric.

FAISS ids are int64; uint64 ids travel as the same 64 bits viewed as int64. A FAISS index
must not be searched while it changes, so searches, online upserts and the swap to a new
index version share a lock: a search in flight finishes on the index it started on.

On a GPU (faiss-gpu and `device="gpu"`) the index is searched there while a CPU copy stays
the master: GPU indexes cannot `remove_ids`, so an upsert changes the CPU copy and copies it
over again, and GPU searches are capped at k = 2048.
"""

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

log = logging.getLogger(__name__)

FLAT_MAX_ITEMS = 50_000  # exact search stays fast enough below this many items
GPU_MAX_K = 2048  # faiss GPU k-selection limit
Device = Literal["cpu", "gpu", "auto"]


def default_factory(n_items: int) -> str:
    if n_items <= FLAT_MAX_ITEMS:
        return "IDMap2,Flat"
    nlist = 1 << int(round(math.log2(4 * math.sqrt(n_items))))
    return f"IDMap2,IVF{nlist},Flat"


def gpus_available() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass(frozen=True)
class SearchParams:
    nprobe: int = 32  # IVF: lists scanned per query
    ef_search: int = 128  # HNSW: candidate list length per query


class ItemIndex:
    def __init__(self, index: faiss.Index, params: SearchParams = SearchParams(), device: Device = "cpu"):
        self._lock = threading.Lock()
        self.params = params
        self.device: str = "cpu"
        self._cpu = index  # the master copy: upserts and saves go here
        self.index = index  # what searches use: the CPU copy or its GPU clone
        self._gpu_resources = None
        self._apply_params(index)
        if device == "gpu" or (device == "auto" and gpus_available()):
            self._to_gpu()

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray,
        factory: str = "auto",
        params: SearchParams = SearchParams(),
        seed: int = 0,
        device: Device = "cpu",
    ) -> "ItemIndex":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        factory = default_factory(len(ids)) if factory == "auto" else factory
        if not factory.startswith("IDMap"):
            factory = "IDMap2," + factory
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            try:
                faiss.extract_index_ivf(index).cp.seed = seed
            except RuntimeError:
                pass  # not IVF: nothing seeded
            log.info("training %s on %d vectors", factory, len(vectors))
            index.train(vectors)  # faiss samples 256 points per centroid: millions of items are fine
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.uint64).view(np.int64))
        return cls(index, params, device)

    def _apply_params(self, index: faiss.Index) -> None:
        inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
        try:
            faiss.extract_index_ivf(index).nprobe = self.params.nprobe
        except RuntimeError:
            pass  # not an IVF index: nothing to probe
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = self.params.ef_search

    def _to_gpu(self) -> None:
        if not gpus_available():
            raise RuntimeError("a GPU index was asked for, but faiss sees no GPU (is faiss-gpu installed?)")
        try:
            self._gpu_resources = self._gpu_resources or faiss.StandardGpuResources()
            options = faiss.GpuClonerOptions()
            gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._cpu, options)
        except RuntimeError as exc:  # e.g. HNSW has no GPU implementation
            log.warning("index stays on the CPU: %s", exc)
            return
        try:
            faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", self.params.nprobe)
        except RuntimeError:
            pass  # not IVF
        self.index, self.device = gpu, "gpu"

    @property
    def description(self) -> str:
        """The index type, as faiss names its classes (outermost first)."""
        names, index = [], self._cpu
        while index is not None:
            index = faiss.downcast_index(index)
            names.append(type(index).__name__)
            index = getattr(index, "index", None) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else None
        return ",".join(names)

    def __len__(self) -> int:
        return self._cpu.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, uint64 ids) per query; rows padded with id 0 / -inf past ntotal."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            k = max(1, min(k, self._cpu.ntotal, GPU_MAX_K if self.device == "gpu" else k))
            scores, ids = self.index.search(queries, k)
        valid = ids != -1
        return np.where(valid, scores, -np.inf), np.where(valid, ids, 0).view(np.uint64)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._cpu.reconstruct_batch(np.asarray(ids, dtype=np.uint64).view(np.int64))

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace items' vectors; returns how many ids were new to the index."""
        keys = np.ascontiguousarray(np.asarray(ids, dtype=np.uint64).view(np.int64))
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            replaced = self._cpu.remove_ids(faiss.IDSelectorBatch(keys))
            self._cpu.add_with_ids(vectors, keys)
            if self.device == "gpu":
                self._to_gpu()
        return len(keys) - replaced

    def replace_with(self, other: "ItemIndex") -> None:
        """Serve `other`'s index from now on: searches in flight finish on the old one."""
        with self._lock:
            self._cpu, self.index, self.device = other._cpu, other.index, other.device
            self._gpu_resources, self.params = other._gpu_resources, other.params

    def warm_up(self, queries: int = 64, k: int = 100, seed: int = 0) -> None:
        """Touch the index's memory with a few searches before it takes traffic."""
        if not len(self):
            return
        rng = np.random.default_rng(seed)
        probes = rng.normal(size=(queries, self._cpu.d)).astype(np.float32)
        probes /= np.linalg.norm(probes, axis=1, keepdims=True)
        self.search(probes, k)

    def save(self, path: Path) -> None:
        with self._lock:
            faiss.write_index(self._cpu, str(path))

    @classmethod
    def load(cls, path: Path, params: SearchParams = SearchParams(), device: Device = "cpu") -> "ItemIndex":
        return cls(faiss.read_index(str(path)), params, device)
