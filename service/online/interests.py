"""Keeps kNN-Embed's per-user interests current: each positive event adds its item's cluster
to the user's recency-weighted counts (older counts decay by the same half-life the artifact
was built with), so the next request splits its budget by the new mixture. A batch job
(`recsys knn-embed refresh`) recomputes every user's smoothing from the live tables, so
users who arrived or changed since the artifact was built get neighbours that match."""

import logging

import numpy as np
import torch
from tqdm import tqdm

from service.data.feature_space import FeatureSpace
from service.data.histories import UserHistories
from service.embeddings.recent_items import RecentItems
from service.embeddings.store import EmbeddingStore, Lookup
from service.embeddings.tables import INTEREST_TABLE, ITEM_TABLE, SMOOTHING_TABLE, USER_TABLE
from service.metrics import ONLINE_ROWS_WRITTEN
from service.retrieval.knn_embed import (
    ItemClusters,
    UserMixtures,
    neighbour_mixtures,
    normalise_rows,
)
from service.retrieval.two_tower import TwoTower, UserTowerKernel

log = logging.getLogger(__name__)


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

    def clusters_of(
        self, item_ids: np.ndarray, fresh: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """The artifact's cluster of each item; items it lacks are embedded from their table
        row (or from `fresh`: sorted ids and their vectors, not yet written) and assigned to
        the nearest centroid (-1: no row yet)."""
        clusters = self.mixtures.cluster_of(item_ids)
        new = clusters < 0
        if new.any():
            lookup = self.store.get_many(ITEM_TABLE, item_ids[new])
            if lookup.degraded:
                raise ConnectionError("embedding table unavailable")
            vectors, found = lookup.vectors.copy(), lookup.found.copy()
            if fresh is not None and len(fresh[0]):
                at = np.minimum(np.searchsorted(fresh[0], item_ids[new]), len(fresh[0]) - 1)
                hit = fresh[0][at] == item_ids[new]
                vectors[hit], found[hit] = fresh[1][at[hit]], True
            attributes = torch.from_numpy(
                self.features.item_attributes[self.features.items.rows(item_ids[new])]
            )
            with torch.inference_mode():
                vectors = self.two_tower.item_tower_from_vectors(
                    torch.from_numpy(vectors), attributes
                ).numpy()
            clusters[new] = np.where(found, self.clusters.assign(vectors), -1)
        return clusters

    def update(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Add the (user, item) pairs, in order, to the users' interest counts."""
        users, rows = self.rows_after(user_ids, item_ids)
        self.store.put_many(INTEREST_TABLE, users, rows)
        ONLINE_ROWS_WRITTEN.labels(INTEREST_TABLE).inc(len(users))

    def rows_after(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        fresh: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(users, their interest rows once the pairs are added), written by the caller."""
        clusters = self.clusters_of(item_ids, fresh)
        users, owner = np.unique(user_ids, return_inverse=True)
        lookup = self.store.get_many(INTEREST_TABLE, users)
        if lookup.degraded:
            raise ConnectionError("embedding table unavailable")
        counts = lookup.vectors.astype(np.float64)
        for row, cluster in zip(owner, clusters):
            if cluster >= 0:
                counts[row] *= self.decay
                counts[row, cluster] += 1.0
        return users, counts.astype(np.float32)


def _checked(lookup: Lookup) -> Lookup:
    if lookup.degraded:
        raise ConnectionError("embedding table unavailable")
    return lookup


def live_user_vectors(
    two_tower: TwoTower,
    histories: UserHistories,
    store: EmbeddingStore,
    recent: RecentItems | None,
    user_ids: np.ndarray,
    history_length: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The user-tower vector serving would compute for each user now (user row, the rows of
    their latest items: the artifact's history, then what arrived since), and which
    users have any of those rows (the rest have no vector of their own)."""
    kernel = UserTowerKernel(two_tower)
    users = _checked(store.get_many(USER_TABLE, user_ids))
    since = (
        recent.get_many(user_ids)
        if recent is not None
        else [np.empty(0, np.uint64)] * len(user_ids)
    )
    latest = [
        np.concatenate([histories.get(int(u)), more])[-history_length:]
        for u, more in zip(user_ids.tolist(), since)
    ]
    lengths = np.array([len(items) for items in latest])
    flat = np.concatenate(latest) if len(latest) else np.empty(0, np.uint64)
    items = (
        _checked(store.get_many(ITEM_TABLE, flat))
        if len(flat)
        else Lookup(np.zeros((0, users.vectors.shape[1]), np.float32), np.zeros(0, bool))
    )
    history, valid = padded_histories(items, lengths, users.vectors.shape[1])
    return (
        kernel(users.vectors, history, valid).astype(np.float32),
        users.found | valid.any(1),
    )


def padded_histories(items: Lookup, lengths: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows looked up for several users' histories one after another (`lengths` each) as
    [B, L, dim] left-padded, the latest item last, and where a row was found."""
    width = int(lengths.max()) if len(lengths) else 0
    history = np.zeros((len(lengths), width, dim), np.float32)
    valid = np.zeros((len(lengths), width), bool)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    slot = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    slot += np.repeat(width - lengths, lengths)
    history[owner, slot] = items.vectors
    valid[owner, slot] = items.found
    return history, valid


def refresh_smoothing(
    two_tower: TwoTower,
    histories: UserHistories,
    store: EmbeddingStore,
    recent: RecentItems | None,
    neighbours: int,
    history_length: int,
    batch_size: int = 4096,
) -> int:
    """Recompute `interest_smoothing` for every user the `interest` table holds: the mean
    mixture of their `neighbours` nearest users by live user vector. Users without a vector
    of their own neither get nor give smoothing. Returns the rows written."""
    user_ids, counts = [], []
    for ids, rows in tqdm(
        store.scan(INTEREST_TABLE, batch_size), desc="interests", unit="batch", mininterval=2
    ):
        user_ids.append(ids)
        counts.append(rows)
    if not user_ids:
        return 0
    user_ids, counts = np.concatenate(user_ids), np.concatenate(counts)
    vectors, known = [], []
    for start in tqdm(
        range(0, len(user_ids), batch_size), desc="user vectors", unit="batch", mininterval=2
    ):
        batch_vectors, batch_known = live_user_vectors(
            two_tower,
            histories,
            store,
            recent,
            user_ids[start : start + batch_size],
            history_length,
        )
        vectors.append(batch_vectors)
        known.append(batch_known)
    known = np.concatenate(known)
    user_ids, counts, vectors = user_ids[known], counts[known], np.concatenate(vectors)[known]
    log.info("smoothing %d users' interests over their %d nearest users", len(user_ids), neighbours)
    smoothing = neighbour_mixtures(vectors, normalise_rows(counts), neighbours)
    for start in range(0, len(user_ids), batch_size):
        store.put_many(
            SMOOTHING_TABLE,
            user_ids[start : start + batch_size],
            smoothing[start : start + batch_size],
        )
    return len(user_ids)
