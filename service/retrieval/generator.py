"""Candidate generation for one request: user vector from the embedding table and the
user's latest items (the artifact's history, those since, the request's session), FAISS
search (single vector, or kNN-Embed's per-interest searches plus a reserved single-vector
share), item-to-item candidates from the user's latest items interleaved at their share,
exclusion of what the user has seen, popular items for cold users and to fill up. A
request's filter (`AllowedItems`) holds for every source: inside the index searches, and
over the item-to-item and popular items. Items the catalog hides or deleted are out of the
index; they are also dropped from every answer, for the moment between the catalog's change
and the index's."""

import numpy as np

from service.data.histories import UserHistories
from service.embeddings.recent_items import RecentItems
from service.embeddings.store import EmbeddingStore
from service.embeddings.tables import INTEREST_TABLE, ITEM_TABLE, SMOOTHING_TABLE, USER_TABLE
from service.retrieval.candidates import (
    SOURCE_KNN_EMBED,
    SOURCE_TWO_TOWER,
    STRATEGY_KNN_EMBED,
    STRATEGY_TWO_TOWER,
    Candidates,
    is_in_sorted,
    labels,
)
from service.retrieval.catalog import AllowedItems, ItemCatalog
from service.retrieval.index import ItemIndex
from service.retrieval.item_to_item import ItemNeighbours, interleaved, item_to_item_candidates
from service.retrieval.knn_embed import ItemClusters, MixtureKnobs, smoothed_mixture, split_budget
from service.retrieval.popular import PopularItems
from service.retrieval.two_tower import TwoTower, UserTowerKernel


class CandidateGenerator:
    def __init__(
        self,
        two_tower: TwoTower,
        index: ItemIndex,
        store: EmbeddingStore,
        histories: UserHistories,
        popular: PopularItems,
        history_length: int,
        recent: RecentItems | None = None,
        clusters: ItemClusters | None = None,
        knobs: MixtureKnobs = MixtureKnobs(),
        neighbours: ItemNeighbours | None = None,
        item_to_item_share: float = 0.0,
        catalog: ItemCatalog | None = None,
    ):
        """`clusters`: kNN-Embed's item clusters (none: only the single-vector strategy);
        `knobs`: its defaults, which a request may override; `neighbours`: the item-to-item
        source, which takes `item_to_item_share` of the candidates (0: none); `catalog`: whose
        hidden and deleted items are never answered."""
        self.user_tower = UserTowerKernel(two_tower)
        self.index = index
        self.clusters = clusters
        self.knobs = knobs
        self.store = store
        self.histories = histories
        self.popular = popular
        self.history_length = history_length
        self.recent = recent
        self.neighbours = neighbours
        self.item_to_item_share = item_to_item_share if neighbours is not None else 0.0
        self.catalog = catalog

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
        d = user.vectors.shape[1]
        history = items.vectors[None] if items is not None else np.zeros((1, 0, d), np.float32)
        valid = items.found[None] if items is not None else np.zeros((1, 0), bool)
        return self.user_tower(user.vectors, history, valid).astype(np.float32), degraded

    def history(self, user_id: int) -> tuple[np.ndarray, bool]:
        """The user's items, oldest first: the artifact's, then those since; and whether the
        recent items were unavailable."""
        history = self.histories.get(user_id)
        if self.recent is None:
            return history, False
        recent, degraded = self.recent.get(user_id)
        return (np.concatenate([history, recent]) if len(recent) else history), degraded

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

    def single_vector(
        self,
        vector: np.ndarray,
        n: int,
        excluded: np.ndarray,
        allowed: AllowedItems | None = None,
    ) -> Candidates:
        """The user vector's nearest `n` items; `excluded`: sorted, distinct."""
        scores, ids = self.index.search(vector, n + len(excluded), allowed)
        scores, ids = scores[0], ids[0]
        keep = np.isfinite(scores) & ~is_in_sorted(ids, excluded)
        ids, scores = ids[keep][:n], scores[keep][:n].astype(np.float32)
        return Candidates(ids, scores, labels(SOURCE_TWO_TOWER, len(ids)))

    def per_interest(
        self,
        vector: np.ndarray,
        n: int,
        excluded: np.ndarray,
        clusters: np.ndarray,
        weights: np.ndarray,
        allowed: AllowedItems | None = None,
    ) -> Candidates:
        """Each interest's share of `n`: the user vector's nearest items inside that cluster.
        `excluded`: sorted, distinct."""
        budgets = split_budget(n, weights)
        clusters, budgets = clusters[budgets > 0], budgets[budgets > 0]
        if not len(clusters):
            return Candidates.empty()
        # Excluded items may sit in any cluster: ask each for that many more.
        scores, ids = self.clusters.search_components(
            vector[0], clusters, int(budgets.max()) + len(excluded), allowed
        )
        keep = np.isfinite(scores) & ~is_in_sorted(ids, excluded)
        keep &= np.cumsum(keep, axis=1) <= budgets[:, None]  # each row's first `budget` kept
        taken = keep.sum(1)
        return Candidates(
            ids[keep],  # row by row: the components in mixture order, each best first
            scores[keep].astype(np.float32),
            labels(SOURCE_KNN_EMBED, int(taken.sum())),
            components=np.repeat(np.array(clusters.tolist(), dtype=object), taken),
        )

    def with_item_to_item(
        self,
        found: Candidates,
        vector: np.ndarray,
        history: np.ndarray,
        n: int,
        excluded: np.ndarray,
        allowed: AllowedItems | None = None,
    ) -> Candidates:
        """`found` with the item-to-item source's candidates interleaved at its share; those
        scored by cosine with the user vector like every other, for the ranker's feature."""
        ids, _ = self.neighbours.top(history[-self.history_length :], n, excluded, allowed)
        if not len(ids):
            return found
        scores = self.index.reconstruct(ids) @ vector[0]
        return interleaved(found, item_to_item_candidates(ids, scores), self.item_to_item_share, n)

    def generate(
        self,
        user_id: int,
        n: int,
        exclude: np.ndarray,
        strategy: str = STRATEGY_TWO_TOWER,
        knobs: MixtureKnobs | None = None,
        session: np.ndarray | None = None,
        allowed: AllowedItems | None = None,
    ) -> Candidates:
        """`session`: the request's latest items, oldest first, after the user's history:
        the user vector and the item-to-item source read them, and they are not answered.
        `allowed`: only these items are answered (a request's filter)."""
        history, recent_degraded = self.history(user_id)
        if session is not None and len(session):
            history = np.concatenate([history, np.asarray(session, dtype=np.uint64)])
        excluded = np.union1d(history, np.asarray(exclude, dtype=np.uint64))
        blocked = self.catalog.blocked if self.catalog is not None else excluded[:0]
        vector, degraded = self.user_vector(user_id, history)
        degraded |= recent_degraded
        if vector is None:
            result = self.popular.top(n, np.union1d(excluded, blocked), allowed)
            result.degraded = degraded
            return result
        result = Candidates.empty()
        if strategy == STRATEGY_KNN_EMBED and self.clusters is not None:
            knobs = knobs or self.knobs
            clusters, weights, mixture_degraded = self.mixture(user_id, knobs)
            degraded |= mixture_degraded
            reserved = int(round(n * knobs.reserved_share)) if len(clusters) else n
            result = self.per_interest(vector, n - reserved, excluded, clusters, weights, allowed)
        # The single vector fills what is left: its reserved share, interests that ran short.
        if len(result):
            fill = self.single_vector(
                vector, n - len(result), np.union1d(excluded, result.item_ids), allowed
            )
            result = result.extended(fill).ranked()
        else:  # FAISS ranked them already
            result = self.single_vector(vector, n, excluded, allowed)
        if self.item_to_item_share > 0.0 and len(history):
            result = self.with_item_to_item(result, vector, history, n, excluded, allowed)
        if len(blocked):
            result = result.take(np.flatnonzero(~is_in_sorted(result.item_ids, blocked)))
        result.degraded = degraded
        if len(result) < n:  # a small catalog: fill up with popular items
            taken = np.union1d(np.union1d(excluded, blocked), result.item_ids)
            result = result.extended(self.popular.top(n - len(result), taken, allowed))
        return result
