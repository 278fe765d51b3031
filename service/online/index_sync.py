"""Keeps a serving process's FAISS index in step with the online trainer and the catalog.

Reads the item-update feed from the start of this artifact namespace's feed (so a process
started later replays every online change), reads the announced items' id vectors from the
embedding table past the local cache, re-embeds them with the item tower and upserts them
into the index (and kNN-Embed's per-cluster index). A failed read is retried from the same
cursor: no update is skipped.

Catalog changes (`service.online.catalog_follow`) go to the catalog and to the index: an
upserted item is embedded from its attributes (and its table row, if it has one) and
indexed before any click; a hidden or deleted item leaves the index (and the trainer's
updates of it are not applied until it is unhidden or upserted again); an unhidden one
comes back. Both feeds are applied under one lock, so neither undoes the other.
"""

import logging
import threading
import time

import numpy as np
import torch

from service.embeddings.store import EmbeddingStore
from service.embeddings.tables import ITEM_TABLE
from service.metrics import FRESHNESS, INDEX_SYNC_DELAY, INDEX_UPSERTS
from service.online.catalog_follow import CatalogFollower, apply_to_catalog
from service.online.streams import CatalogChange, CatalogFeed, ItemUpdateFeed
from service.retrieval.candidates import is_in_sorted
from service.retrieval.catalog import ItemCatalog
from service.retrieval.index import ItemIndex
from service.retrieval.knn_embed import ItemClusters
from service.retrieval.two_tower import TwoTower

log = logging.getLogger(__name__)


class IndexSync:
    def __init__(
        self,
        two_tower: TwoTower,
        catalog: ItemCatalog,
        store: EmbeddingStore,
        index: ItemIndex,
        feed: ItemUpdateFeed,
        block_seconds: float = 1.0,
        clusters: ItemClusters | None = None,
        catalog_feed: CatalogFeed | None = None,
    ):
        """`catalog`: the one the pipeline answers from, changed here as the catalog feed
        says; `clusters`: kNN-Embed's per-cluster index, kept in step with `index`."""
        self.two_tower = two_tower
        self.catalog = catalog
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
        self.catalog_follower = (
            CatalogFollower(catalog_feed, self.apply_catalog, block_seconds, self._lock)
            if catalog_feed is not None
            else None
        )

    def apply(
        self, item_ids: np.ndarray, index: ItemIndex | None = None, from_attributes: bool = False
    ) -> int:
        """Re-embed items from the table into the index (or `index`); returns how many were
        new to it. Hidden and deleted items are left out. `from_attributes`: a catalog item
        the table has no row for is embedded from its attributes (and the table's default)."""
        item_ids = item_ids[~is_in_sorted(item_ids, self.catalog.blocked)]
        if not len(item_ids):
            return 0
        self.store.invalidate(ITEM_TABLE, item_ids)
        lookup = self.store.get_many(ITEM_TABLE, item_ids)
        if lookup.degraded:
            raise ConnectionError("embedding table unavailable")
        embedded = lookup.found  # a row that expired since is left as indexed
        if from_attributes:
            embedded = embedded | self.catalog.holds(item_ids)
        ids = item_ids[embedded]
        if not len(ids):
            return 0
        attributes = torch.from_numpy(self.catalog.attribute_rows(ids))
        with torch.inference_mode():
            vectors = self.two_tower.item_tower_from_vectors(
                torch.from_numpy(lookup.vectors[embedded]), attributes
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

    def apply_catalog(self, change: CatalogChange, index: ItemIndex | None = None) -> None:
        """A catalog change, to the catalog and then to the index (or `index`)."""
        apply_to_catalog(self.catalog, change)
        target = index or self.index
        if change.op in ("upsert", "unhide"):
            self.apply(change.item_ids, index, from_attributes=True)
        elif change.op in ("hide", "delete"):
            target.remove(change.item_ids)
            if self.clusters is not None and index is None:
                self.clusters.remove(change.item_ids)
        target.contents_changed()

    def _apply_catalog_state(self, index: ItemIndex) -> None:
        """What the catalog changed so far, into a new index version."""
        if len(self.catalog.blocked):
            index.remove(self.catalog.blocked)
        if len(self.catalog.upserted_ids):
            self.apply(self.catalog.upserted_ids, index, from_attributes=True)
        index.contents_changed()

    def catch_up_catalog(self) -> int:
        """Every catalog change published so far, before the process serves."""
        return self.catalog_follower.catch_up() if self.catalog_follower is not None else 0

    def run_catalog(self, stop: threading.Event) -> None:
        if self.catalog_follower is not None:
            self.catalog_follower.run(stop)

    def swap_in(self, new_index: ItemIndex) -> None:
        """Replay every update applied so far into `new_index` (a new index version), and
        the catalog's changes, then make the served index use it; updates published
        meanwhile wait for the next step."""
        with self._lock:
            cursor = ItemUpdateFeed.START
            while cursor != self.cursor:
                updates = self.feed.read(cursor, 0)
                if updates.cursor == cursor:
                    break  # the feed was trimmed past what this process applied
                if len(updates.item_ids):
                    self.apply(updates.item_ids, new_index)
                cursor = updates.cursor
            self._apply_catalog_state(new_index)
            self.index.replace_with(new_index)

    def run(self, stop: threading.Event, retry_seconds: float = 1.0) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("index sync failed; retrying from the same feed position")
                stop.wait(retry_seconds)
