"""Keeps a process's item catalog in step with the catalog feed: the catalog API's changes
(upserts with attributes, hides, unhides, deletes), replayed from the feed's start when
the process starts (before it serves: a hidden item stays hidden across restarts) and
then followed. A gateway follows with this alone, for its fallback answers; a serving
process's index sync (`service.online.index_sync`) applies the same changes to its index
too. Numpy only."""

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from service.online.streams import CatalogChange, CatalogFeed
from service.retrieval.catalog import ItemCatalog

log = logging.getLogger(__name__)


def apply_to_catalog(catalog: ItemCatalog, change: CatalogChange) -> None:
    if change.op == "upsert":
        catalog.upsert(change.item_ids, change.attributes or [{} for _ in change.item_ids])
    elif change.op in ("hide", "unhide", "delete"):
        getattr(catalog, change.op)(change.item_ids)
    else:  # a newer writer's operation: skipped, loudly, rather than stopping the reader
        log.error(
            "unknown catalog change %r for %d items: skipped", change.op, len(change.item_ids)
        )


class CatalogFollower:
    """The catalog feed, read from `cursor` on, applied by `apply` (under `lock`)."""

    def __init__(
        self,
        feed: CatalogFeed,
        apply: Callable[[CatalogChange], None],
        block_seconds: float = 1.0,
        lock: AbstractContextManager | None = None,
    ):
        self.feed = feed
        self.apply = apply
        self.block_seconds = block_seconds
        self.cursor = CatalogFeed.START
        self._lock = lock or threading.Lock()

    def step(self, block_seconds: float | None = None) -> int:
        """Apply the changes after the cursor; returns how many there were. A change that
        fails is retried from the same cursor (applying one twice does no harm)."""
        wait = self.block_seconds if block_seconds is None else block_seconds
        cursor, changes = self.feed.read(self.cursor, wait)
        with self._lock:
            for change in changes:
                self.apply(change)
            self.cursor = cursor
        return len(changes)

    def catch_up(self) -> int:
        """Every change published so far, without waiting for more."""
        applied = 0
        while True:
            read = self.step(block_seconds=0)
            if not read:
                return applied
            applied += read

    def run(self, stop: threading.Event, retry_seconds: float = 1.0) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("catalog sync failed; retrying from the same feed position")
                stop.wait(retry_seconds)
