"""Candidate generation for one request: user vector from the embedding table, FAISS
search (single vector, or kNN-Embed's per-interest searches plus a reserved single-vector
share), exclusion of what the user has seen (in the artifact's history and since), popular
items for cold users and to fill up."""

from dataclasses import dataclass, field

import numpy as np
import torch

from service.embeddings.artifact_tables import ITEM_TABLE, USER_TABLE
from service.embeddings.store import EmbeddingStore
from service.history import UserHistories
from service.online.recent import RecentItems
from service.retrieval.index import ItemIndex
from service.retrieval.knn_embed import INTEREST_TABLE, SMOOTHING_TABLE, ItemClusters, MixtureKnobs, smoothed_mixture, split_budget
from service.retrieval.two_tower import TwoTower

SOURCE_TWO_TOWER, SOURCE_KNN_EMBED, SOURCE_POPULAR = "two_tower", "knn_embed", "popular"
STRATEGY_TWO_TOWER, STRATEGY_KNN_EMBED = "two_tower", "knn_embed"


@dataclass
class Candidates:
    item_ids: np.ndarray  # uint64
    scores: np.ndarray  # float32 cosine: with the user vector, or the cold-user vector for popular
    sources: list[str]
    degraded: bool = False  # the embedding store failed: vectors were defaults
    components: list[int | None] = field(default_factory=list)  # kNN-Embed: each candidate's cluster

    def __post_init__(self) -> None:
        if not self.components:
            self.components = [None] * len(self.sources)

    def __len__(self) -> int:
        return len(self.item_ids)

    def ranked(self) -> "Candidates":
        """Best score first, whatever found it (ties keep their order)."""
        order = np.argsort(-self.scores, kind="stable")
        return Candidates(
            self.item_ids[order],
            self.scores[order],
            [self.sources[i] for i in order],
            self.degraded,
            [self.components[i] for i in order],
        )

    def extended(self, more: "Candidates") -> "Candidates":
        return Candidates(
            np.concatenate([self.item_ids, more.item_ids]),
            np.concatenate([self.scores, more.scores]).astype(np.float32),
            self.sources + more.sources,
            self.degraded or more.degraded,
            self.components + more.components,
        )


class CandidateGenerator:
    def __init__(
        self,
        two_tower: TwoTower,
        index: ItemIndex,
        store: EmbeddingStore,
        histories: UserHistories,
        popular_items: np.ndarray,
        popular_scores: np.ndarray,
        history_length: int,
        recent: RecentItems | None = None,
        clusters: ItemClusters | None = None,
        knobs: MixtureKnobs = MixtureKnobs(),
    ):
        """`clusters`: kNN-Embed's item clusters (none: only the single-vector strategy);
        `knobs`: its defaults, which a request may override."""
        self.two_tower = two_tower
        self.index = index
        self.clusters = clusters
        self.knobs = knobs
        self.store = store
        self.histories = histories
        self.popular_items = popular_items
        self.popular_scores = popular_scores
        self.history_length = history_length
        self.recent = recent

    def user_vector(self, user_id: int, history: np.ndarray) -> tuple[np.ndarray | None, bool]:
        """The user-tower output (None for a user the table and history know nothing of),
        and whether the store failed on the way."""
        user = self.store.get_many(USER_TABLE, [user_id])
        recent = history[-self.history_length :]
        items = self.store.get_many(ITEM_TABLE, recent) if len(recent) else None
        degraded = user.degraded or (items is not None and items.degraded)
        known_items = items is not None and items.found.any()
        if not user.found[0] and not known_items:
            return None, degraded
        pooled = items.vectors[items.found].mean(0) if known_items else np.zeros(user.vectors.shape[1], np.float32)
        with torch.inference_mode():
            vector = self.two_tower.user_tower(torch.from_numpy(user.vectors), torch.from_numpy(pooled[None, :]))
        return vector.numpy(), degraded

    def history(self, user_id: int) -> tuple[np.ndarray, bool]:
        """The user's items, oldest first: the artifact's, then those since; and whether the
        recent items were unavailable."""
        history = self.histories.get(user_id)
        if self.recent is None:
            return history, False
        recent, degraded = self.recent.get(user_id)
        return (np.concatenate([history, recent]) if len(recent) else history), degraded

    def popular(self, n: int, excluded: np.ndarray) -> Candidates:
        keep = ~np.isin(self.popular_items, excluded)
        ids = self.popular_items[keep][:n]
        return Candidates(ids, self.popular_scores[keep][:n], [SOURCE_POPULAR] * len(ids))

    def mixture(self, user_id: int, knobs: MixtureKnobs) -> tuple[np.ndarray, np.ndarray, bool]:
        """The user's top-m interests (clusters, weights; empty without interests) and
        whether the store failed."""
        lookup_counts = self.store.get_many(INTEREST_TABLE, [user_id])
        smoothing = self.store.get_many(SMOOTHING_TABLE, [user_id])
        degraded = lookup_counts.degraded or smoothing.degraded
        if not lookup_counts.found[0]:
            return np.empty(0, np.int64), np.empty(0, np.float32), degraded
        clusters, weights = smoothed_mixture(
            lookup_counts.vectors[0], smoothing.vectors[0] if smoothing.found[0] else None, knobs
        )
        return clusters, weights, degraded

    def single_vector(self, vector: np.ndarray, n: int, excluded: np.ndarray) -> Candidates:
        scores, ids = self.index.search(vector, n + len(excluded))
        scores, ids = scores[0], ids[0]
        keep = np.isfinite(scores) & ~np.isin(ids, excluded)
        ids, scores = ids[keep][:n], scores[keep][:n].astype(np.float32)
        return Candidates(ids, scores, [SOURCE_TWO_TOWER] * len(ids))

    def per_interest(self, vector: np.ndarray, n: int, excluded: np.ndarray, clusters: np.ndarray, weights: np.ndarray) -> Candidates:
        """Each interest's share of `n`: the user vector's nearest items inside that cluster."""
        budgets = split_budget(n, weights)
        clusters, budgets = clusters[budgets > 0], budgets[budgets > 0]
        if not len(clusters):
            return Candidates(np.empty(0, np.uint64), np.empty(0, np.float32), [])
        # Excluded items may sit in any cluster: ask each for that many more.
        scores, ids = self.clusters.search_components(vector[0], clusters, int(budgets.max()) + len(excluded))
        found_ids, found_scores, found_from = [], [], []
        for cluster, budget, row_scores, row_ids in zip(clusters.tolist(), budgets, scores, ids):
            keep = np.isfinite(row_scores) & ~np.isin(row_ids, excluded)
            found_ids.append(row_ids[keep][:budget])
            found_scores.append(row_scores[keep][:budget])
            found_from += [cluster] * len(found_ids[-1])
        item_ids = np.concatenate(found_ids)
        return Candidates(item_ids, np.concatenate(found_scores).astype(np.float32), [SOURCE_KNN_EMBED] * len(item_ids), components=found_from)

    def generate(
        self,
        user_id: int,
        n: int,
        exclude: np.ndarray,
        strategy: str = STRATEGY_TWO_TOWER,
        knobs: MixtureKnobs | None = None,
    ) -> Candidates:
        history, recent_degraded = self.history(user_id)
        excluded = np.union1d(history, np.asarray(exclude, dtype=np.uint64))
        vector, degraded = self.user_vector(user_id, history)
        degraded |= recent_degraded
        if vector is None:
            result = self.popular(n, excluded)
            result.degraded = degraded
            return result
        result = Candidates(np.empty(0, np.uint64), np.empty(0, np.float32), [])
        if strategy == STRATEGY_KNN_EMBED and self.clusters is not None:
            knobs = knobs or self.knobs
            clusters, weights, mixture_degraded = self.mixture(user_id, knobs)
            degraded |= mixture_degraded
            reserved = int(round(n * knobs.reserved_share)) if len(clusters) else n
            result = self.per_interest(vector, n - reserved, excluded, clusters, weights)
        # The single vector fills what is left: its reserved share, interests that ran short.
        fill = self.single_vector(vector, n - len(result), np.union1d(excluded, result.item_ids))
        result = result.extended(fill).ranked()
        result.degraded = degraded
        if len(result) < n:  # a small catalog: fill up with popular items
            result = result.extended(self.popular(n - len(result), np.union1d(excluded, result.item_ids)))
        return result
