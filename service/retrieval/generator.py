"""Candidate generation for one request: user vector from the embedding table, FAISS
search, exclusion of what the user has seen (in the artifact's history and since), popular
items for cold users and to fill up."""

from dataclasses import dataclass

import numpy as np
import torch

from service.embeddings.artifact_tables import ITEM_TABLE, USER_TABLE
from service.embeddings.store import EmbeddingStore
from service.history import UserHistories
from service.online.recent import RecentItems
from service.retrieval.index import ItemIndex
from service.retrieval.two_tower import TwoTower

SOURCE_TWO_TOWER, SOURCE_POPULAR = "two_tower", "popular"


@dataclass
class Candidates:
    item_ids: np.ndarray  # uint64
    scores: np.ndarray  # float32 cosine: with the user vector, or the cold-user vector for popular
    sources: list[str]
    degraded: bool = False  # the embedding store failed: vectors were defaults


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
    ):
        self.two_tower = two_tower
        self.index = index
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

    def generate(self, user_id: int, n: int, exclude: np.ndarray) -> Candidates:
        history, recent_degraded = self.history(user_id)
        excluded = np.union1d(history, np.asarray(exclude, dtype=np.uint64))
        vector, degraded = self.user_vector(user_id, history)
        degraded |= recent_degraded
        if vector is None:
            result = self.popular(n, excluded)
            result.degraded = degraded
            return result
        scores, ids = self.index.search(vector, n + len(excluded))
        scores, ids = scores[0], ids[0]
        keep = np.isfinite(scores) & ~np.isin(ids, excluded)
        ids, scores = ids[keep][:n], scores[keep][:n].astype(np.float32)
        result = Candidates(ids, scores, [SOURCE_TWO_TOWER] * len(ids), degraded)
        if len(ids) < n:  # a small catalog: fill up with popular items
            fill = self.popular(n - len(ids), np.union1d(excluded, ids))
            result = Candidates(
                np.concatenate([ids, fill.item_ids]),
                np.concatenate([scores, fill.scores]),
                result.sources + fill.sources,
                degraded,
            )
        return result
