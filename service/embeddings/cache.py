"""A bounded, short-lived in-process cache in front of a remote table.

Hot ids cost no round trip for `ttl_seconds` (about the sync interval of the writers).
Absent ids are cached too, so an unknown id does not hit Redis on every request. Misses
that another thread is already fetching wait for that fetch instead of sending their own
(single flight), so concurrent misses for one id cost one round trip.
"""

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
from cachetools import TTLCache

ABSENT = None  # cached value of an id the table does not hold

Fetch = Callable[[list[int]], tuple[list[np.ndarray | None], bool]]


class LocalCache:
    def __init__(self, max_entries: int, ttl_seconds: float):
        self._entries: TTLCache = TTLCache(max_entries, ttl_seconds, timer=time.monotonic)
        self._inflight: dict[tuple[str, int], Future] = {}
        self._lock = threading.Lock()

    def get_many(self, table: str, ids: list[int], fetch: Fetch, wait_seconds: float) -> tuple[list, np.ndarray, bool]:
        """Rows for `ids` (an array, or ABSENT) and which came from this cache.

        `fetch(missing_ids)` returns (rows, failed); a failed fetch is not cached.
        Returns (rows, cached mask, degraded).
        """
        rows: list = [ABSENT] * len(ids)
        cached = np.zeros(len(ids), dtype=bool)
        mine: list[int] = []
        theirs: list[tuple[int, Future]] = []
        own: dict[int, Future] = {}
        with self._lock:
            for i, item in enumerate(ids):
                key = (table, item)
                if key in self._entries:
                    rows[i] = self._entries[key]
                    cached[i] = True
                elif key in self._inflight:
                    theirs.append((i, self._inflight[key]))
                elif item in own:
                    theirs.append((i, own[item]))
                else:
                    own[item] = self._inflight[key] = Future()
                    mine.append(i)
        degraded = False
        if mine:
            missing = [ids[i] for i in mine]
            try:
                fetched, failed = fetch(missing)
            except BaseException:
                fetched, failed = [ABSENT] * len(missing), True
                self._settle(table, own, missing, fetched, failed)
                raise
            self._settle(table, own, missing, fetched, failed)
            degraded = failed
            for i, row in zip(mine, fetched):
                rows[i] = row
        for i, future in theirs:
            try:
                row, failed = future.result(timeout=wait_seconds)
            except TimeoutError:
                row, failed = ABSENT, True
            rows[i] = row
            degraded |= failed
        return rows, cached, degraded

    def _settle(self, table: str, own: dict[int, Future], missing: list[int], fetched: list, failed: bool) -> None:
        with self._lock:
            for item, row in zip(missing, fetched):
                if not failed:
                    self._entries[(table, item)] = row
                self._inflight.pop((table, item), None)
        for item, row in zip(missing, fetched):
            own[item].set_result((row, failed))

    def invalidate(self, table: str, ids: list[int]) -> None:
        with self._lock:
            for item in ids:
                self._entries.pop((table, item), None)

    def __len__(self) -> int:
        return len(self._entries)
