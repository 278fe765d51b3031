"""A bounded, short-lived in-process cache in front of a remote table.

Hot ids cost no round trip for `ttl_seconds` (about the sync interval of the writers).
Absent ids are cached too, so an unknown id does not reach Redis on every request. Misses
that another thread is already fetching wait for that fetch instead of sending their own
(single flight), so concurrent misses for one id cost one round trip.

Each table's entries sit in a ring of preallocated rows. Every entry lives equally long,
so the ring's write order is its expiry order and overwriting the oldest slot is both
eviction and expiry. A lookup is one dict read per id, then a single numpy gather with a
vectorised expiry check: no per-row Python work on the hot path.
"""

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

# fetch(missing ids) -> (vectors (n, dim), found (n,), failed)
Fetch = Callable[[list[int]], tuple[np.ndarray, np.ndarray, bool]]


class _Ring:
    def __init__(self, capacity: int, dim: int):
        self.slot_of: dict[int, int] = {}
        self.ids = np.zeros(capacity, dtype=np.uint64)
        self.rows = np.zeros((capacity, dim), dtype=np.float32)
        self.found = np.zeros(capacity, dtype=bool)
        self.expires = np.full(capacity, -np.inf)
        self.next = 0

    def put(self, ids: list[int], rows: np.ndarray, found: np.ndarray, expires: float) -> None:
        capacity = len(self.ids)
        for item, row, ok in zip(ids, rows, found):
            slot = self.next
            self.next = (slot + 1) % capacity
            old = int(self.ids[slot])
            if self.slot_of.get(old) == slot:
                del self.slot_of[old]
            self.ids[slot], self.rows[slot], self.found[slot], self.expires[slot] = (
                item,
                row,
                ok,
                expires,
            )
            self.slot_of[item] = slot


class LocalCache:
    def __init__(self, max_entries: int, ttl_seconds: float):
        self.max_entries = max_entries  # per table
        self.ttl_seconds = ttl_seconds
        self._rings: dict[str, _Ring] = {}
        self._inflight: dict[tuple[str, int], tuple[Future, int]] = {}
        self._lock = threading.Lock()

    def get_many(self, table: str, ids: list[int], dim: int, fetch: Fetch, wait_seconds: float):
        """(vectors, found, cached, degraded) for distinct `ids`; a failed fetch is not cached."""
        ring = self._rings.get(table)
        if ring is None:
            with self._lock:
                ring = self._rings.setdefault(table, _Ring(self.max_entries, dim))
        slots = np.fromiter(
            (ring.slot_of.get(item, -1) for item in ids), dtype=np.int64, count=len(ids)
        )
        safe = np.maximum(slots, 0)
        # A slot read while another thread rewrites it fails the id check and counts as a miss.
        cached = (
            (slots >= 0)
            & (ring.expires[safe] > time.monotonic())
            & (ring.ids[safe] == np.array(ids, dtype=np.uint64))
        )
        vectors = ring.rows[safe]
        found = ring.found[safe] & cached
        if cached.all():
            return vectors, found, cached, False
        missing: list[int] = []
        waiting: list[tuple[int, Future, int]] = []
        with self._lock:
            for i in np.flatnonzero(~cached).tolist():
                flight = self._inflight.get((table, ids[i]))
                if flight is not None:
                    waiting.append((i, *flight))
                else:
                    missing.append(i)
            if missing:
                future: Future = Future()
                for position, i in enumerate(missing):
                    self._inflight[(table, ids[i])] = (future, position)
        degraded = False
        if missing:
            keys = [ids[i] for i in missing]
            try:
                result = fetch(keys)
            except BaseException as exc:
                self._land(table, keys, future, None, exc)
                raise
            self._land(table, keys, future, result, None)
            vectors[missing], found[missing], degraded = result
        for i, other, position in waiting:
            try:
                fetched, present, failed = other.result(timeout=wait_seconds)
            except Exception:
                degraded = True
                continue
            vectors[i], found[i] = fetched[position], present[position]
            degraded |= failed
        return vectors, found, cached, degraded

    def _land(
        self, table: str, keys: list[int], future: Future, result, error: BaseException | None
    ) -> None:
        """Cache a fetch that did not fail, release its ids, wake the threads waiting on it."""
        with self._lock:
            for key in keys:
                self._inflight.pop((table, key), None)
            if result is not None and not result[2]:
                self._rings[table].put(
                    keys, result[0], result[1], time.monotonic() + self.ttl_seconds
                )
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def invalidate(self, table: str, ids: list[int]) -> None:
        with self._lock:
            ring = self._rings.get(table)
            if ring is not None:
                for item in ids:
                    slot = ring.slot_of.pop(item, None)
                    if slot is not None:
                        ring.expires[slot] = -np.inf
