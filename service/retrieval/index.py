"""FAISS item index over real 64-bit item ids (IndexIDMap2) with inner-product metric.

FAISS ids are int64; uint64 ids travel as the same 64 bits viewed as int64. A FAISS index
must not be searched while it changes, so searches, online upserts and the swap to a new
index version share a lock: a search in flight finishes on the index it started on.

HNSW graphs cannot remove vectors: there an upsert goes into a small exact side index, and
searches of the graph skip the ids it holds (an ID selector) before the two are merged; a
removed item (hidden or deleted from the catalog) is skipped the same way.

On a GPU (faiss-gpu and `device="gpu"`) the index is searched there while a CPU copy stays
the master: GPU indexes cannot `remove_ids`, so an upsert changes the CPU copy and copies it
over again, and GPU searches are capped at k = 2048.

A filtered search (`AllowedItems`) runs inside the index, as the default index for a
catalog of the kept items' size would search them: up to FLAT_MAX_ITEMS kept items, exactly
(their vectors read back once per filter and kept current through upserts); more, by IVF
with an ID selector, probing lists nearest first until it has scanned the share of the kept
items that `IVF{default_lists(kept)}` at the same nprobe scans of its catalog. The lists
are counted per filter, so a filter that keeps little near the query (bags for a user of
shoes) probes further instead of losing recall. HNSW searches with the selector and efSearch
raised by the inverse of the kept share. Filtered searches run on the CPU copy: faiss's GPU
indexes take no ID selector.
"""

import contextlib
import itertools
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from tqdm import tqdm

from service.retrieval.candidates import is_in_sorted
from service.retrieval.catalog import AllowedItems

log = logging.getLogger(__name__)

FLAT_MAX_ITEMS = 50_000  # exact search stays fast enough below this many items
TRAIN_POINTS_PER_LIST = 256  # what faiss's k-means uses per centroid at most: more is wasted
ADD_BATCH = 100_000  # items added per step of a build, so that progress shows
GPU_MAX_K = 2048  # faiss GPU k-selection limit
MISSING_SCORE = -1e38  # faiss pads missing inner-product results with -FLT_MAX
MAX_EF_SEARCH = 4096  # HNSW's efSearch under a filter: raised by 1 / kept share up to this
CHANGES_KEPT = 256  # upserts remembered, so a filter's vectors are patched, not read again
Device = Literal["cpu", "gpu", "auto"]


_search_threads: int | None = None  # `set_search_threads`: serving processes


def set_search_threads(threads: int) -> None:
    """OpenMP threads of this process's FAISS searches from now on. A serving process
    searches one query per request, too small to gain from more threads, and idle OpenMP
    threads spin on the cores that concurrent requests need. Training keeps FAISS's default
    (every core)."""
    global _search_threads
    _search_threads = threads
    faiss.omp_set_num_threads(threads)


def limit_search_threads() -> None:
    """Before a search: OpenMP keeps its thread count per calling thread, and a request
    thread starts with the default (every core), whatever the thread that loaded set."""
    if _search_threads is not None:
        faiss.omp_set_num_threads(_search_threads)


def default_lists(n_items: int) -> int:
    """IVF lists for a catalog of `n_items`: about 4 sqrt(n), a power of two."""
    return 1 << int(round(math.log2(4 * math.sqrt(max(n_items, 1)))))


def default_factory(n_items: int) -> str:
    if n_items <= FLAT_MAX_ITEMS:
        return "IDMap2,Flat"
    return f"IVF{default_lists(n_items)},Flat"


def selector_of(allowed: AllowedItems) -> faiss.IDSelector:
    """A faiss ID selector for the kept items, made once per filter (a hash set: building
    one for a million ids takes a tenth of a second)."""
    selector = allowed.derived.get("selector")
    if selector is None:
        selector = faiss.IDSelectorBatch(allowed.ids.view(np.int64))
        allowed.derived["selector"] = selector
        allowed.derived_bytes += 48 * len(allowed)  # the hash set's nodes, near enough
    return selector


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each row of `scores` (nq, n) over `ids` (n,), padded with id 0 /
    -FLT_MAX as faiss pads (the caller reads both alike)."""
    nq, n = scores.shape
    everything = np.broadcast_to(np.arange(n), (nq, n))
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k] if n > k else everything
    chosen = np.take_along_axis(scores, best, 1)
    order = np.argsort(-chosen, axis=1, kind="stable")
    best, chosen = np.take_along_axis(best, order, 1), np.take_along_axis(chosen, order, 1)
    out_scores = np.full((nq, k), np.float32(-3.4e38), dtype=np.float32)
    out_ids = np.zeros((nq, k), dtype=np.int64)
    out_scores[:, : best.shape[1]] = chosen
    out_ids[:, : best.shape[1]] = ids.view(np.int64)[best]
    return out_scores, out_ids


def search_preassigned(
    ivf: faiss.IndexIVF,
    queries: np.ndarray,
    k: int,
    lists: np.ndarray,
    list_scores: np.ndarray,
    params: faiss.SearchParametersIVF,
) -> tuple[np.ndarray, np.ndarray]:
    """`ivf.search_preassigned` with search parameters (an ID selector): faiss's Python
    wrapper refuses them, its C++ call takes them. `params.nprobe` must be `lists`' width."""
    n = len(queries)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    list_scores = np.ascontiguousarray(list_scores, dtype=np.float32)
    assert lists.shape == list_scores.shape == (n, params.nprobe)
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    ivf.search_preassigned_c(
        n,
        faiss.swig_ptr(queries),
        k,
        faiss.swig_ptr(lists),
        faiss.swig_ptr(list_scores),
        faiss.swig_ptr(scores),
        faiss.swig_ptr(ids),
        False,
        params,
    )
    return scores, ids


@dataclass
class KeptVectors:
    """A filter's kept items that the index holds, their vectors, and the index state they
    were read at (the epoch of its contents, the count of upserts)."""

    epoch: int
    generation: int
    ids: np.ndarray  # sorted uint64
    vectors: np.ndarray  # (len(ids), d) float32


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
    _numbers = itertools.count()  # tells indexes apart in a filter's derived data

    def __init__(
        self, index: faiss.Index, params: SearchParams = SearchParams(), device: Device = "cpu"
    ):
        self._lock = threading.Lock()
        self._number = next(self._numbers)
        self._epoch = 0  # changes when the index is replaced: per-filter data is redone
        self._generation = 0  # counts upserts; `_changes` keeps the latest ones' ids
        self._changes: list[tuple[int, np.ndarray]] = []
        self._entries: tuple[int, np.ndarray, np.ndarray | None] | None = None
        self._centroid_matrix: tuple[int, np.ndarray] | None = None
        self.params = params
        self.device: str = "cpu"
        index = by_item_ids(index)
        self._cpu = index  # the master copy: upserts and saves go here
        self.index = index  # what searches use: the CPU copy or its GPU clone
        self._gpu_resources = None
        self._side: faiss.Index | None = None  # HNSW: upserted items, searched exactly
        self._side_ids = np.empty(0, np.int64)  # graph ids searches skip: replaced or removed
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

    def search(
        self, queries: np.ndarray, k: int, allowed: AllowedItems | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, uint64 ids) per query, only `allowed` items if given; rows padded
        with id 0 / -inf past what the index holds."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        limit_search_threads()
        with self._lock:
            k = max(1, min(k, len(self), GPU_MAX_K if self.device == "gpu" else k))
            if allowed is not None:
                scores, ids = self._search_filtered(queries, k, allowed)
            elif self._side is None:
                scores, ids = self.index.search(queries, k)
            else:
                scores, ids = self._search_graph_and_side(queries, k)
        valid = scores > MISSING_SCORE  # not ids != -1: that is also item 2**64 - 1
        return np.where(valid, scores, -np.inf), np.where(valid, ids, 0).view(np.uint64)

    def _search_graph_and_side(
        self, queries: np.ndarray, k: int, allowed: AllowedItems | None = None, ef: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef, self.params.ef_search)
        # The selectors stay referenced here until the search returns: params does not own them.
        shadowed = faiss.IDSelectorBatch(self._side_ids)
        skip = faiss.IDSelectorNot(shadowed)
        kept = selector_of(allowed) if allowed is not None else None
        params.sel = faiss.IDSelectorAnd(skip, kept) if kept is not None else skip
        scores, ids = self._cpu.search(queries, k, params=params)
        if self._side is None or not self._side.ntotal:
            return scores, ids
        side_params = faiss.SearchParameters()
        side_params.sel = kept
        side_scores, side_ids = self._side.search(
            queries, min(k, self._side.ntotal), params=side_params if kept is not None else None
        )
        scores, ids = np.hstack([scores, side_scores]), np.hstack([ids, side_ids])
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)

    def _search_filtered(
        self, queries: np.ndarray, k: int, allowed: AllowedItems
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(allowed) <= FLAT_MAX_ITEMS:
            kept = self._kept_vectors(allowed)
            return top_k(queries @ kept.vectors.T, kept.ids, k)
        if isinstance(self._cpu, faiss.IndexIVF):
            return self._search_ivf_filtered(queries, k, allowed)
        if isinstance(self._inner(self._cpu), faiss.IndexHNSW):
            ef = int(min(MAX_EF_SEARCH, self.params.ef_search / max(allowed.share, 1e-9)))
            return self._search_graph_and_side(queries, k, allowed, ef)
        params = faiss.SearchParameters()  # a flat index: exact, skipping what is not kept
        params.sel = selector_of(allowed)
        return self._cpu.search(queries, k, params=params)

    def _search_ivf_filtered(
        self, queries: np.ndarray, k: int, allowed: AllowedItems
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query probes its nearest lists until they hold the share of the kept items
        that the default IVF index for a catalog of that many items scans at this nprobe."""
        ivf = self._cpu
        counts = self._kept_per_list(allowed)
        # Every list in order, for each query: one product with the centroids (faiss's
        # quantizer search keeps a heap of nlist, several times slower).
        coarse_scores = queries @ self._centroids().T
        lists = np.argsort(-coarse_scores, axis=1, kind="stable")
        coarse_scores = np.take_along_axis(coarse_scores, lists, 1)
        target = self._scan_target(len(allowed))
        scanned = np.cumsum(counts[np.maximum(lists, 0)], axis=1)
        probes = np.minimum((scanned < target).sum(1) + 1, ivf.nlist)
        width = int(probes.max())
        lists = np.ascontiguousarray(lists[:, :width])
        # faiss skips list -1: what lies past a query's probes, and lists with nothing kept
        lists[(np.arange(width)[None, :] >= probes[:, None]) | (counts[lists] == 0)] = -1
        params = faiss.SearchParametersIVF()
        params.nprobe = width
        params.sel = selector_of(allowed)
        return search_preassigned(ivf, queries, k, lists, coarse_scores[:, :width], params)

    def _indexed_entries(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The ids the index held when its contents last changed (sorted, int64) and, for
        IVF, each one's list. The trainer's upserts since then replaced items or added ids
        from events, which carry no attributes and so meet no filter: the snapshot holds.
        The catalog's changes call `contents_changed`, which takes a new snapshot."""
        if self._entries is not None and self._entries[0] == self._epoch:
            return self._entries[1], self._entries[2]
        if isinstance(self._cpu, faiss.IndexIVF):
            lists = self._cpu.invlists
            per_list = [
                faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
                for number in range(self._cpu.nlist)
            ]
            ids = np.concatenate(per_list) if per_list else np.empty(0, np.int64)
            list_of = np.repeat(np.arange(len(per_list)), [len(p) for p in per_list])
            order = np.argsort(ids.view(np.uint64), kind="stable")
            ids, list_of = ids[order], list_of[order]
        else:
            ids = faiss.vector_to_array(self._cpu.id_map)
            if self._side is not None:  # HNSW: the graph's ids it still serves, and the side's
                ids = np.union1d(
                    ids[~np.isin(ids, self._side_ids)], faiss.vector_to_array(self._side.id_map)
                )
            ids = np.sort(ids.view(np.uint64)).view(np.int64)
            list_of = None
        self._entries = (self._epoch, ids, list_of)
        return ids, list_of

    def _scan_target(self, kept: int) -> float:
        """How many kept items a filtered IVF search scans: the share of them the default
        index for a catalog of `kept` items scans, and no fewer than this index scans of
        its catalog unfiltered."""
        unfiltered = self._cpu.ntotal * min(1.0, self.params.nprobe / self._cpu.nlist)
        return max(kept * min(1.0, self.params.nprobe / default_lists(kept)), min(kept, unfiltered))

    def _centroids(self) -> np.ndarray:
        """The IVF lists' centroids, read once per index contents (an inner-product index:
        a list's score is its centroid's product with the query)."""
        if self._centroid_matrix is None or self._centroid_matrix[0] != self._epoch:
            quantizer = self._cpu.quantizer
            self._centroid_matrix = (self._epoch, quantizer.reconstruct_n(0, quantizer.ntotal))
        return self._centroid_matrix[1]

    def _kept_per_list(self, allowed: AllowedItems) -> np.ndarray:
        """How many kept items each IVF list holds (counted once per filter and index)."""
        key = ("lists", self._number)
        cached = allowed.derived.get(key)
        if cached is not None and cached[0] == self._epoch:
            return cached[1]
        ids, list_of = self._indexed_entries()
        held = is_in_sorted(ids.view(np.uint64), allowed.ids)
        counts = np.bincount(list_of[held], minlength=self._cpu.nlist)
        allowed.derived[key] = (self._epoch, counts)
        return counts

    def _changed_since(self, generation: int) -> np.ndarray | None:
        """The ids upserted after `generation`, or None if they are no longer all known."""
        if generation == self._generation:
            return np.empty(0, np.int64)
        if not self._changes or self._changes[0][0] > generation + 1:
            return None
        return np.concatenate([keys for number, keys in self._changes if number > generation])

    def _kept_vectors(self, allowed: AllowedItems) -> KeptVectors:
        """The kept items' vectors, read from the index once per filter and then patched
        with the upserts since, so that a search reads the index's current vectors."""
        key = ("vectors", self._number)
        kept = allowed.derived.get(key)
        if kept is not None and kept.epoch == self._epoch:
            changed = self._changed_since(kept.generation)
            if changed is not None:
                rows = np.flatnonzero(is_in_sorted(kept.ids, np.unique(changed.view(np.uint64))))
                if len(rows):
                    kept.vectors[rows] = self._reconstruct(kept.ids[rows].view(np.int64))
                kept.generation = self._generation
                return kept
        entries, _ = self._indexed_entries()
        ids = allowed.ids[is_in_sorted(allowed.ids, entries.view(np.uint64))]
        vectors = (
            self._reconstruct(ids.view(np.int64))
            if len(ids)
            else np.empty((0, self._cpu.d), np.float32)
        )
        if kept is not None:
            allowed.derived_bytes -= kept.vectors.nbytes
        kept = KeptVectors(self._epoch, self._generation, ids, vectors)
        allowed.derived[key] = kept
        allowed.derived_bytes += vectors.nbytes
        return kept

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The indexed vectors of `ids`, zeros for an id the index does not hold (or did
        not when its contents last changed: an item the trainer added since)."""
        keys = np.asarray(ids, dtype=np.uint64).view(np.int64)
        with self._lock:
            entries, _ = self._indexed_entries()
            held = is_in_sorted(keys.view(np.uint64), entries.view(np.uint64))
            vectors = np.zeros((len(keys), self._cpu.d), np.float32)
            if held.any():
                vectors[held] = self._reconstruct(keys[held])
        return vectors

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The indexed vectors of `ids`; a RuntimeError if the index lacks one of them."""
        keys = np.asarray(ids, dtype=np.uint64).view(np.int64)
        with self._lock:
            return self._reconstruct(keys)

    def _reconstruct(self, keys: np.ndarray) -> np.ndarray:
        if self._side is None:
            return self._cpu.reconstruct_batch(np.ascontiguousarray(keys))
        side = faiss.vector_to_array(self._side.id_map)
        on_side = np.isin(keys, side)
        vectors = np.empty((len(keys), self._cpu.d), np.float32)
        if (~on_side).any():
            vectors[~on_side] = self._cpu.reconstruct_batch(np.ascontiguousarray(keys[~on_side]))
        for row in np.flatnonzero(on_side):
            vectors[row] = self._side.reconstruct(int(keys[row]))
        return vectors

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
            self._generation += 1
            self._changes = [*self._changes[-(CHANGES_KEPT - 1) :], (self._generation, keys)]
            if isinstance(self._inner(self._cpu), faiss.IndexHNSW):
                return self._upsert_beside_graph(keys, vectors)
            # An array selector: what IVF's hash-table direct map removes by.
            replaced = self._cpu.remove_ids(faiss.IDSelectorArray(keys))
            self._cpu.add_with_ids(vectors, keys)
            if self.device == "gpu":
                self._to_gpu()
        return len(keys) - replaced

    def remove(self, ids: np.ndarray) -> int:
        """Take items out of the index (hidden or deleted from the catalog); returns how
        many it held. HNSW graphs cannot remove: their searches skip the ids instead."""
        keys = np.ascontiguousarray(np.asarray(ids, dtype=np.uint64).view(np.int64))
        with self._lock:
            if isinstance(self._inner(self._cpu), faiss.IndexHNSW):
                removed = self._remove_beside_graph(keys)
            else:
                removed = self._cpu.remove_ids(faiss.IDSelectorArray(keys))
                if self.device == "gpu":
                    self._to_gpu()
            self._contents_changed()
        return removed

    def _remove_beside_graph(self, keys: np.ndarray) -> int:
        if self._graph_ids is None:
            self._graph_ids = np.sort(faiss.vector_to_array(self._cpu.id_map))
        in_graph = keys[np.isin(keys, self._graph_ids) & ~np.isin(keys, self._side_ids)]
        removed = len(in_graph)
        if self._side is not None:
            removed += self._side.remove_ids(faiss.IDSelectorBatch(keys))
        # Graph ids listed here are skipped by every search; an upsert adds them back on
        # the side index.
        self._side_ids = np.union1d(self._side_ids, keys[np.isin(keys, self._graph_ids)])
        if self._side is None:
            self._side = faiss.IndexIDMap2(faiss.IndexFlatIP(self._cpu.d))
        return removed

    def contents_changed(self) -> None:
        """Items came or went other than by the online trainer's upserts (the catalog's
        changes): what filtered searches derived from the old contents is redone."""
        with self._lock:
            self._contents_changed()

    def _contents_changed(self) -> None:
        self._epoch += 1
        self._generation, self._changes = 0, []

    def replace_with(self, other: "ItemIndex") -> None:
        """Serve `other`'s index from now on: searches in flight finish on the old one."""
        with self._lock:
            self._contents_changed()
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
