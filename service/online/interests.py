"""Keeps kNN-Embed's per-user interests current: each positive event adds its item's cluster
to the user's recency-weighted counts (older counts decay by the same half-life the artifact
was built with), so the next request splits its budget by the new mixture."""

import numpy as np
import torch

from service.embeddings.artifact_tables import ITEM_TABLE
from service.embeddings.store import EmbeddingStore
from service.features import FeatureSpace
from service.metrics import ONLINE_ROWS_WRITTEN
from service.retrieval.knn_embed import INTEREST_TABLE, ItemClusters, UserMixtures
from service.retrieval.two_tower import TwoTower


class InterestUpdater:
    def __init__(
        self,
        two_tower: TwoTower,
        features: FeatureSpace,
        store: EmbeddingStore,
        clusters: ItemClusters,
        mixtures: UserMixtures,
        half_life: float,
    ):
        self.two_tower = two_tower
        self.features = features
        self.store = store
        self.clusters = clusters
        self.mixtures = mixtures
        self.decay = 0.5 ** (1.0 / half_life)

    def clusters_of(self, item_ids: np.ndarray) -> np.ndarray:
        """The artifact's cluster of each item; items it lacks are embedded from their table
        row and assigned to the nearest centroid (-1: no row yet)."""
        clusters = self.mixtures.cluster_of(item_ids)
        new = clusters < 0
        if new.any():
            lookup = self.store.get_many(ITEM_TABLE, item_ids[new])
            if lookup.degraded:
                raise ConnectionError("embedding table unavailable")
            attributes = torch.from_numpy(self.features.item_attributes[self.features.items.rows(item_ids[new])])
            with torch.inference_mode():
                vectors = self.two_tower.item_tower_from_vectors(torch.from_numpy(lookup.vectors), attributes).numpy()
            clusters[new] = np.where(lookup.found, self.clusters.assign(vectors), -1)
        return clusters

    def update(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Add the (user, item) pairs, in order, to the users' interest counts."""
        clusters = self.clusters_of(item_ids)
        users, owner = np.unique(user_ids, return_inverse=True)
        lookup = self.store.get_many(INTEREST_TABLE, users)
        if lookup.degraded:
            raise ConnectionError("embedding table unavailable")
        counts = lookup.vectors.astype(np.float64)
        for row, cluster in zip(owner, clusters):
            if cluster >= 0:
                counts[row] *= self.decay
                counts[row, cluster] += 1.0
        self.store.put_many(INTEREST_TABLE, users, counts.astype(np.float32))
        ONLINE_ROWS_WRITTEN.labels(INTEREST_TABLE).inc(len(users))
