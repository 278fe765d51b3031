"""Keeps a serving process's FAISS index in step with the online trainer.

Reads the item-update feed from the start of this artifact namespace's feed (so a process
started later replays every online change), reads the announced items' id vectors from the
embedding table past the local cache, re-embeds them with the item tower and upserts them
into the index (and kNN-Embed's per-cluster index). A failed read is retried from the same cursor: no update is skipped.
"""

import logging
import threading
import time

import numpy as np
import torch

from service.data.feature_space import FeatureSpace
from service.embeddings.store import EmbeddingStore
from service.embeddings.tables import ITEM_TABLE
from service.metrics import FRESHNESS, INDEX_SYNC_DELAY, INDEX_UPSERTS
from service.online.streams import ItemUpdateFeed
from service.retrieval.index import ItemIndex
from service.retrieval.knn_embed import ItemClusters
from service.retrieval.two_tower import TwoTower

log = logging.getLogger(__name__)


class IndexSync:
    def __init__(
        self,
        two_tower: TwoTower,
        features: FeatureSpace,
        store: EmbeddingStore,
        index: ItemIndex,
        feed: ItemUpdateFeed,
        block_seconds: float = 1.0,
        clusters: ItemClusters | None = None,
    ):
        """`clusters`: kNN-Embed's per-cluster index, kept in step with `index`."""
        self.two_tower = two_tower
        self.features = features
        self.store = store
        self.index = index
        self.feed = feed
        self.clusters = clusters
        self.block_seconds = block_seconds
        self.cursor = ItemUpdateFeed.START
        self._lock = (
            threading.Lock()
        )  # one of step() and swap_in() at a time: no update falls between
        self._last_update = time.time()
        FRESHNESS.labels("index").set_function(lambda: time.time() - self._last_update)

    def apply(self, item_ids: np.ndarray, index: ItemIndex | None = None) -> int:
        """Re-embed items from the table into the index (or `index`); returns how many were new to it."""
        self.store.invalidate(ITEM_TABLE, item_ids)
        lookup = self.store.get_many(ITEM_TABLE, item_ids)
        if lookup.degraded:
            raise ConnectionError("embedding table unavailable")
        ids = item_ids[lookup.found]  # a row that expired since is left as indexed
        if not len(ids):
            return 0
        attributes = torch.from_numpy(self.features.item_attributes[self.features.items.rows(ids)])
        with torch.inference_mode():
            vectors = self.two_tower.item_tower_from_vectors(
                torch.from_numpy(lookup.vectors[lookup.found]), attributes
            )
        added = (index or self.index).upsert(ids, vectors.numpy())
        if self.clusters is not None and index is None:
            self.clusters.upsert(ids, vectors.numpy())
        INDEX_UPSERTS.labels("added").inc(added)
        INDEX_UPSERTS.labels("replaced").inc(len(ids) - added)
        return added

    def step(self) -> int:
        """Apply the updates published after the cursor; returns how many items they named."""
        updates = self.feed.read(self.cursor, self.block_seconds)
        with self._lock:
            if updates.cursor == self.cursor:
                return 0
            if len(updates.item_ids):
                self.apply(updates.item_ids)
                self._last_update = time.time()
                INDEX_SYNC_DELAY.observe(max(0.0, self._last_update - updates.published_at))
            self.cursor = updates.cursor
        return len(updates.item_ids)

    def swap_in(self, new_index: ItemIndex) -> None:
        """Replay every update applied so far into `new_index` (a new index version), then
        make the served index use it; updates published meanwhile wait for the next step."""
        with self._lock:
            cursor = ItemUpdateFeed.START
            while cursor != self.cursor:
                updates = self.feed.read(cursor, 0)
                if updates.cursor == cursor:
                    break  # the feed was trimmed past what this process applied
                if len(updates.item_ids):
                    self.apply(updates.item_ids, new_index)
                cursor = updates.cursor
            self.index.replace_with(new_index)

    def run(self, stop: threading.Event, retry_seconds: float = 1.0) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("index sync failed; retrying from the same feed position")
                stop.wait(retry_seconds)
