"""FAISS item index over real 64-bit item ids (IndexIDMap2) with inner-product metric.

FAISS ids are int64; uint64 ids travel as the same 64 bits viewed as int64. A FAISS index
must not be searched while it changes, so searches, online upserts and the swap to a new
index version share a lock: a search in flight finishes on the index it started on.

HNSW graphs cannot remove vectors: there an upsert goes into a small exact side index, and
searches of the graph skip the ids it holds (an ID selector) before the two are merged.

On a GPU (faiss-gpu and `device="gpu"`) the index is searched there while a CPU copy stays
the master: GPU indexes cannot `remove_ids`, so an upsert changes the CPU copy and copies it
over again, and GPU searches are capped at k = 2048.
"""

import contextlib
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

FLAT_MAX_ITEMS = 50_000  # exact search stays fast enough below this many items
TRAIN_POINTS_PER_LIST = 256  # what faiss's k-means uses per centroid at most: more is wasted
ADD_BATCH = 100_000  # items added per step of a build, so that progress shows
GPU_MAX_K = 2048  # faiss GPU k-selection limit
MISSING_SCORE = -1e38  # faiss pads missing inner-product results with -FLT_MAX
Device = Literal["cpu", "gpu", "auto"]


def default_factory(n_items: int) -> str:
    if n_items <= FLAT_MAX_ITEMS:
        return "IDMap2,Flat"
    nlist = 1 << int(round(math.log2(4 * math.sqrt(n_items))))
    return f"IVF{nlist},Flat"


def by_item_ids(index: faiss.Index) -> faiss.Index:
    """An IVF index keyed by the items' own ids, with a hash-table direct map, so an item's
    vector can be read back (the item-to-item source scores its candidates with them) and
    still be removed and re-added (upserts). `IndexIDMap2` over IVF can do neither with a
    direct map: its remove hands IVF a translated selector, which the hash table refuses,
    and without one IVF cannot reconstruct. `build` makes IVF indexes without the wrapper;
    one read from an older file has the wrapper's ids written into its inverted lists and
    the wrapper dropped. Any other index is returned as it is."""
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        if not isinstance(faiss.downcast_index(index.index), faiss.IndexIVF):
            return index
        item_ids = faiss.vector_to_array(index.id_map)
        ivf = faiss.clone_index(index.index)  # its own copy: the wrapper owns the original
        lists = ivf.invlists
        for number in range(ivf.nlist):
            size = lists.list_size(number)
            if size:  # the copy's own buffers, rewritten in place
                ids = faiss.rev_swig_ptr(lists.get_ids(number), size)
                ids[:] = item_ids[ids]
        index = ivf
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def training_sample(vectors: np.ndarray, lists: int, seed: int) -> np.ndarray:
    """What k-means into `lists` centroids trains on: a uniform sample of 256 vectors per
    centroid (faiss would subsample to that itself, after copying the whole catalog)."""
    limit = TRAIN_POINTS_PER_LIST * lists
    if len(vectors) <= limit:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=limit, replace=False))
    return vectors[rows]


UNINDEXABLE_IN_IVF = np.uint64(2**64 - 1)  # -1 as faiss's int64: IVF's "no entry"


def indexable(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray):
    """(ids, vectors) without item 2**64 - 1 where `index` is IVF: it keeps ids itself, and
    its lists read -1 as an empty slot. That one item stays out of the index (a warning
    says so); every other index maps ids apart and holds it."""
    if isinstance(index, faiss.IndexIVF):
        keep = np.asarray(ids, dtype=np.uint64) != UNINDEXABLE_IN_IVF
        if not keep.all():
            log.warning(
                "item %d cannot be held by an IVF index; it is left out", UNINDEXABLE_IN_IVF
            )
            return np.asarray(ids)[keep], vectors[keep]
    return ids, vectors


def add_with_progress(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, name: str) -> None:
    """`index.add_with_ids` in steps, with a progress bar for catalogs of millions."""
    ids, vectors = indexable(index, ids, vectors)
    keys = np.asarray(ids, dtype=np.uint64).view(np.int64)
    with tqdm(
        total=len(keys),
        desc=name,
        unit="item",
        unit_scale=True,
        mininterval=2,
        disable=len(keys) <= ADD_BATCH,
    ) as bar:
        for start in range(0, len(keys), ADD_BATCH):
            index.add_with_ids(vectors[start : start + ADD_BATCH], keys[start : start + ADD_BATCH])
            bar.update(len(keys[start : start + ADD_BATCH]))


def gpus_available() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass(frozen=True)
class SearchParams:
    nprobe: int = 32  # IVF: lists scanned per query
    ef_search: int = 384  # HNSW: candidate list length per query (0.96 recall@100 at 1M items)


class ItemIndex:
    def __init__(
        self, index: faiss.Index, params: SearchParams = SearchParams(), device: Device = "cpu"
    ):
        self._lock = threading.Lock()
        self.params = params
        self.device: str = "cpu"
        index = by_item_ids(index)
        self._cpu = index  # the master copy: upserts and saves go here
        self.index = index  # what searches use: the CPU copy or its GPU clone
        self._gpu_resources = None
        self._side: faiss.Index | None = None  # HNSW: upserted items, searched exactly
        self._side_ids = np.empty(0, np.int64)  # ids in the side index that the graph also holds
        self._graph_ids: np.ndarray | None = None
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
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not isinstance(index, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2)):
            # IVF keeps the items' 64-bit ids itself (see `by_item_ids`); the others by a map.
            factory = "IDMap2," + factory
            index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            try:
                ivf = faiss.extract_index_ivf(index)
                ivf.cp.seed = seed
                sample = training_sample(vectors, ivf.nlist, seed)
            except RuntimeError:  # not IVF: trains on everything
                sample = vectors
            log.info("training %s on %d of %d vectors", factory, len(sample), len(vectors))
            index.train(sample)
        add_with_progress(index, ids, vectors, f"index {factory}")
        return cls(index, params, device)

    @staticmethod
    def _inner(index: faiss.Index) -> faiss.Index:
        return (
            faiss.downcast_index(index.index)
            if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2))
            else index
        )

    def _apply_params(self, index: faiss.Index) -> None:
        inner = self._inner(index)
        with contextlib.suppress(RuntimeError):  # not an IVF index: nothing to probe
            faiss.extract_index_ivf(index).nprobe = self.params.nprobe
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = self.params.ef_search

    def _to_gpu(self) -> None:
        if not gpus_available():
            raise RuntimeError(
                "a GPU index was asked for, but faiss sees no GPU (is faiss-gpu installed?)"
            )
        try:
            self._gpu_resources = self._gpu_resources or faiss.StandardGpuResources()
            options = faiss.GpuClonerOptions()
            gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._cpu, options)
        except RuntimeError as exc:  # e.g. HNSW has no GPU implementation
            log.warning("index stays on the CPU: %s", exc)
            return
        self.index, self.device = gpu, "gpu"
        self._apply_gpu_params()

    def _apply_gpu_params(self) -> None:
        with contextlib.suppress(RuntimeError):  # not IVF
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.params.nprobe)

    def set_params(self, params: SearchParams) -> None:
        """Change nprobe / efSearch for the searches that follow."""
        with self._lock:
            self.params = params
            self._apply_params(self._cpu)
            if self.device == "gpu":
                self._apply_gpu_params()

    @property
    def description(self) -> str:
        """The index type, as faiss names its classes (outermost first)."""
        names, index = [], self._cpu
        while index is not None:
            index = faiss.downcast_index(index)
            names.append(type(index).__name__)
            index = (
                getattr(index, "index", None)
                if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2))
                else None
            )
        return ",".join(names)

    def __len__(self) -> int:
        side = self._side.ntotal - len(self._side_ids) if self._side is not None else 0
        return self._cpu.ntotal + side

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, uint64 ids) per query; rows padded with id 0 / -inf past ntotal."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            k = max(1, min(k, len(self), GPU_MAX_K if self.device == "gpu" else k))
            if self._side is None:
                scores, ids = self.index.search(queries, k)
            else:
                scores, ids = self._search_graph_and_side(queries, k)
        valid = scores > MISSING_SCORE  # not ids != -1: that is also item 2**64 - 1
        return np.where(valid, scores, -np.inf), np.where(valid, ids, 0).view(np.uint64)

    def _search_graph_and_side(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = self.params.ef_search
        # Both selectors stay referenced here until the search returns: params does not own them.
        shadowed = faiss.IDSelectorBatch(self._side_ids)
        skip = faiss.IDSelectorNot(shadowed)
        params.sel = skip
        scores, ids = self._cpu.search(queries, k, params=params)
        side_scores, side_ids = self._side.search(queries, min(k, self._side.ntotal))
        scores, ids = np.hstack([scores, side_scores]), np.hstack([ids, side_ids])
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The indexed vectors of `ids`; a RuntimeError if the index lacks one of them."""
        keys = np.asarray(ids, dtype=np.uint64).view(np.int64)
        with self._lock:
            if self._side is None:
                return self._cpu.reconstruct_batch(keys)
            side = faiss.vector_to_array(self._side.id_map)
            return np.stack(
                [(self._side if key in side else self._cpu).reconstruct(int(key)) for key in keys]
            )

    def _upsert_beside_graph(self, keys: np.ndarray, vectors: np.ndarray) -> int:
        if self._side is None:
            self._side = faiss.IndexIDMap2(faiss.IndexFlatIP(self._cpu.d))
            self._graph_ids = np.sort(faiss.vector_to_array(self._cpu.id_map))
        side = faiss.vector_to_array(self._side.id_map)
        new = int((~np.isin(keys, side) & ~np.isin(keys, self._graph_ids)).sum())
        self._side.remove_ids(faiss.IDSelectorBatch(keys))
        self._side.add_with_ids(vectors, keys)
        self._side_ids = np.union1d(self._side_ids, keys[np.isin(keys, self._graph_ids)])
        return new

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace items' vectors; returns how many ids were new to the index."""
        ids, vectors = indexable(self._cpu, ids, vectors)
        keys = np.ascontiguousarray(np.asarray(ids, dtype=np.uint64).view(np.int64))
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            if isinstance(self._inner(self._cpu), faiss.IndexHNSW):
                return self._upsert_beside_graph(keys, vectors)
            # An array selector: what IVF's hash-table direct map removes by.
            replaced = self._cpu.remove_ids(faiss.IDSelectorArray(keys))
            self._cpu.add_with_ids(vectors, keys)
            if self.device == "gpu":
                self._to_gpu()
        return len(keys) - replaced

    def replace_with(self, other: "ItemIndex") -> None:
        """Serve `other`'s index from now on: searches in flight finish on the old one."""
        with self._lock:
            self._cpu, self.index, self.device = other._cpu, other.index, other.device
            self._gpu_resources, self.params = other._gpu_resources, other.params
            self._side, self._side_ids, self._graph_ids = (
                other._side,
                other._side_ids,
                other._graph_ids,
            )

    def warm_up(self, queries: int = 64, k: int = 100, seed: int = 0) -> None:
        """Touch the index's memory with a few searches before it takes traffic."""
        if not len(self):
            return
        rng = np.random.default_rng(seed)
        probes = rng.normal(size=(queries, self._cpu.d)).astype(np.float32)
        probes /= np.linalg.norm(probes, axis=1, keepdims=True)
        self.search(probes, k)

    def serialized_bytes(self) -> int:
        """The size of the main index as `save` writes it (its memory, near enough)."""
        with self._lock:
            return len(faiss.serialize_index(self._cpu))

    def save(self, path: Path) -> None:
        """The main index only: a rebuilt version (`recsys index build`) takes the upserts in."""
        with self._lock:
            faiss.write_index(self._cpu, str(path))

    @classmethod
    def load(
        cls, path: Path, params: SearchParams = SearchParams(), device: Device = "cpu"
    ) -> "ItemIndex":
        return cls(faiss.read_index(str(path)), params, device)
