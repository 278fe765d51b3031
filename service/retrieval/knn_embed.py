"""kNN-Embed multi-interest retrieval (El-Kishky et al. 2022, "Locally Smoothed Embedding
Mixtures for Multi-interest Candidate Retrieval").

The item vectors are clustered by spherical k-means; the clusters are the interests. A user's
mixture P(c|u) is the recency-weighted share of their items in each cluster, smoothed with
the mixtures of their k nearest users in user-vector space: P~ = (1-a) P + a mean(P of
neighbours). The top-m components split the candidate budget by weight (largest remainder,
so the split is deterministic), each component is searched with the user vector inside its
cluster (one batched `search_preassigned` over an IVF index whose lists are the clusters),
and a share of the budget stays with the plain single-vector search.

What is kept per user, in two embedding tables so that each has one writer: `interest`, the
recency-weighted cluster counts (the online trainer adds each click), and
`interest_smoothing`, the mean mixture of the user's neighbours (written when the artifact is
built and by `recsys knn-embed refresh`). Mixing them at request time keeps a and m free per
request.
"""

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from service.retrieval.catalog import AllowedItems
from service.retrieval.index import (
    MISSING_SCORE,
    add_with_progress,
    limit_search_threads,
    search_preassigned,
    selector_of,
    training_sample,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnEmbedConfig:
    """Build-time knobs: they shape the artifact (and `recsys knn-embed refresh`)."""

    clusters: int = 32
    neighbours: int = 10  # k nearest users whose mixtures smooth a user's
    half_life: float = 20.0  # interactions: the n-th latest counts 0.5 ** (n / half_life)
    kmeans_iterations: int = 25
    seed: int = 0


@dataclass(frozen=True)
class MixtureKnobs:
    """Request-time knobs: settings give the defaults, a request may override each."""

    alpha: float = 0.5  # smoothing weight of the neighbours' mixture
    components: int = 8  # m: interests kept
    reserved_share: float = 0.2  # of the budget, for the plain single-vector search


class ItemClusters:
    """Spherical k-means centroids of the item vectors, as the coarse quantizer of an
    inner-product IVF index that holds every item in its cluster's list (real ids)."""

    def __init__(self, index: faiss.IndexIVFFlat):
        self.index = index
        self.index.nprobe = 1  # each component searches its own cluster's list only
        self.quantizer = faiss.downcast_index(index.quantizer)
        self.centroids = self.quantizer.reconstruct_n(0, index.nlist)
        self._lock = threading.Lock()  # a FAISS index must not be searched while it changes

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray,
        n_clusters: int,
        iterations: int = 25,
        seed: int = 0,
    ) -> "ItemClusters":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n_clusters = max(1, min(n_clusters, len(vectors)))
        sample = training_sample(vectors, n_clusters, seed)
        log.info(
            "clustering %d item vectors into %d interests, trained on %d",
            len(vectors),
            n_clusters,
            len(sample),
        )
        kmeans = faiss.Kmeans(
            vectors.shape[1], n_clusters, niter=iterations, spherical=True, seed=seed
        )
        kmeans.train(sample)
        quantizer = faiss.IndexFlatIP(vectors.shape[1])
        quantizer.add(kmeans.centroids)
        index = faiss.IndexIVFFlat(
            quantizer, vectors.shape[1], n_clusters, faiss.METRIC_INNER_PRODUCT
        )
        add_with_progress(index, ids, vectors, "interest clusters")
        return cls(index)

    @property
    def n_clusters(self) -> int:
        return self.index.nlist

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """The cluster of each vector: its nearest centroid."""
        _, clusters = self.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        return clusters[:, 0]

    def cluster_sizes(self) -> np.ndarray:
        return np.array(
            [self.index.invlists.list_size(c) for c in range(self.n_clusters)], dtype=np.int64
        )

    def search_components(
        self, query: np.ndarray, clusters: np.ndarray, k: int, allowed: AllowedItems | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, uint64 ids) of `query` inside each of `clusters`, one row per
        cluster, in one batched call; rows padded with id 0 / -inf past a cluster's size.
        `allowed`: only those items (each cluster's list is scanned whole: still exact)."""
        clusters = np.asarray(clusters, dtype=np.int64).reshape(-1, 1)
        queries = np.ascontiguousarray(
            np.repeat(query.reshape(1, -1), len(clusters), 0), dtype=np.float32
        )
        centroid_scores = np.ascontiguousarray(
            (queries * self.centroids[clusters[:, 0]]).sum(1, keepdims=True)
        )
        params = faiss.SearchParametersIVF()
        params.nprobe = 1
        if allowed is not None:
            params.sel = selector_of(allowed)
        limit_search_threads()
        with self._lock:
            scores, ids = search_preassigned(
                self.index, queries, k, clusters, centroid_scores, params
            )
        valid = scores > MISSING_SCORE  # not ids != -1: that is also item 2**64 - 1
        return np.where(valid, scores, -np.inf), np.where(valid, ids, 0).view(np.uint64)

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace items, each into the list of its nearest centroid."""
        keys = np.ascontiguousarray(np.asarray(ids, dtype=np.uint64).view(np.int64))
        with self._lock:
            self.index.remove_ids(faiss.IDSelectorBatch(keys))
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), keys)

    def remove(self, ids: np.ndarray) -> None:
        """Take items out of their clusters' lists (hidden or deleted from the catalog)."""
        keys = np.ascontiguousarray(np.asarray(ids, dtype=np.uint64).view(np.int64))
        with self._lock:
            self.index.remove_ids(faiss.IDSelectorBatch(keys))

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> "ItemClusters":
        return cls(faiss.read_index(str(path)))


def interest_counts(
    user_ids: np.ndarray,
    offsets: np.ndarray,
    item_clusters: np.ndarray,
    n_clusters: int,
    half_life: float,
) -> np.ndarray:
    """(users, clusters) recency-weighted counts from histories laid out as `offsets` into
    `item_clusters` (each user's items oldest first; -1 for an item without a cluster)."""
    counts = np.zeros((len(user_ids), n_clusters), dtype=np.float64)
    lengths = np.diff(offsets)
    owner = np.repeat(np.arange(len(user_ids)), lengths)
    age = (
        np.concatenate([np.arange(n - 1, -1, -1) for n in lengths]) if len(lengths) else np.zeros(0)
    )
    keep = item_clusters >= 0
    np.add.at(counts, (owner[keep], item_clusters[keep]), 0.5 ** (age[keep] / half_life))
    return counts.astype(np.float32)


def normalise_rows(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def neighbour_mixtures(
    user_vectors: np.ndarray, mixtures: np.ndarray, k: int, batch_size: int = 4096
) -> np.ndarray:
    """Mean mixture of each user's k nearest other users by inner product of user vectors."""
    vectors = np.ascontiguousarray(user_vectors, dtype=np.float32)
    k = min(k, len(vectors) - 1)
    smoothed = np.zeros_like(mixtures)
    if k < 1:
        return smoothed
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    for start in tqdm(
        range(0, len(vectors), batch_size), desc="user neighbours", unit="batch", mininterval=2
    ):
        _, found = index.search(vectors[start : start + batch_size], k + 1)
        rows = np.arange(start, start + len(found))[:, None]
        others = np.where(found == rows, -1, found)  # a user is not their own neighbour
        # Keep the first k others per row (self may be anywhere among ties, or absent).
        order = np.argsort(others < 0, axis=1, kind="stable")[:, :k]
        chosen = np.take_along_axis(others, order, 1)
        smoothed[start : start + len(found)] = mixtures[chosen].mean(1)
    return smoothed


def smoothed_mixture(
    counts: np.ndarray, smoothing: np.ndarray | None, knobs: MixtureKnobs
) -> tuple[np.ndarray, np.ndarray]:
    """Top-m (clusters, weights summing to 1) of (1-a) P + a N; empty for a user without
    counts. Ties go to the lower cluster id."""
    total = float(counts.sum())
    if total <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    mixture = counts / total
    if smoothing is not None and np.count_nonzero(smoothing):
        mixture = (1 - knobs.alpha) * mixture + knobs.alpha * smoothing
    order = np.argsort(-mixture, kind="stable")[: knobs.components]  # stable: ties by cluster id
    order = order[mixture[order] > 0]
    weights = mixture[order]
    return order.astype(np.int64), (weights / weights.sum()).astype(np.float32)


def split_budget(total: int, weights: np.ndarray) -> np.ndarray:
    """`total` split in proportion to `weights` by largest remainder: the floors, then one
    more for the largest fractional parts (ties to the earlier component)."""
    if total <= 0 or not len(weights):
        return np.zeros(len(weights), dtype=np.int64)
    quotas = total * np.asarray(weights, dtype=np.float64) / np.sum(weights)
    shares = np.floor(quotas).astype(np.int64)
    left = total - int(shares.sum())
    shares[np.lexsort((np.arange(len(quotas)), -(quotas - shares)))[:left]] += 1
    return shares


@dataclass
class UserMixtures:
    """The artifact's users' interest counts and neighbour mixtures (what the two tables
    are loaded with), and the cluster of every catalog item."""

    user_ids: np.ndarray  # uint64, sorted
    counts: np.ndarray  # (users, clusters) recency-weighted counts
    smoothing: np.ndarray  # (users, clusters) mean mixture of the k nearest users
    item_ids: np.ndarray  # uint64, sorted: the catalog
    item_clusters: np.ndarray  # int64 cluster of each catalog item

    @classmethod
    def build(
        cls,
        histories,
        user_vectors: np.ndarray,
        item_ids: np.ndarray,
        item_clusters: np.ndarray,
        n_clusters: int,
        config: KnnEmbedConfig,
    ) -> "UserMixtures":
        """`histories` (UserHistories) and `user_vectors` are aligned by user; `item_clusters`
        with the sorted `item_ids`."""
        items = histories.items
        at = np.minimum(np.searchsorted(item_ids, items), len(item_ids) - 1)
        clusters = np.where(item_ids[at] == items, item_clusters[at], -1)
        counts = interest_counts(
            histories.user_ids, histories.offsets, clusters, n_clusters, config.half_life
        )
        smoothing = neighbour_mixtures(user_vectors, normalise_rows(counts), config.neighbours)
        return cls(
            histories.user_ids,
            counts,
            smoothing,
            np.asarray(item_ids, np.uint64),
            item_clusters.astype(np.int64),
        )

    def cluster_of(self, item_ids: np.ndarray) -> np.ndarray:
        """The artifact's cluster of each item; -1 for an item it does not hold."""
        item_ids = np.asarray(item_ids, dtype=np.uint64)
        if not len(self.item_ids):
            return np.full(len(item_ids), -1, np.int64)
        at = np.minimum(np.searchsorted(self.item_ids, item_ids), len(self.item_ids) - 1)
        return np.where(self.item_ids[at] == item_ids, self.item_clusters[at], -1)

    def save(self, path: Path) -> None:
        save_file(
            {
                "user_ids": self.user_ids,
                "counts": self.counts,
                "smoothing": self.smoothing,
                "item_ids": self.item_ids,
                "item_clusters": self.item_clusters,
            },
            path,
        )

    @classmethod
    def load(cls, path: Path) -> "UserMixtures":
        arrays = load_file(path)
        return cls(
            arrays["user_ids"],
            arrays["counts"],
            arrays["smoothing"],
            arrays["item_ids"],
            arrays["item_clusters"],
        )
