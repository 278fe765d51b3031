"""Each user's latest positive items since the artifact was trained, newest last, capped.

The artifact's histories are read-only; this is what the online trainer appends to as
clicks arrive, so a click changes the user's pooled vector and exclusions at once.

Redis layout (one list per user):

    rec:{<namespace>.recent:<shard>}:<user id>   RPUSH of 8-byte little-endian uint64 item ids,
                                                 LTRIM to the newest `length`, PEXPIRE ttl
"""

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque

import numpy as np
import redis

from service.breaker import BreakerOpen, CircuitBreaker

log = logging.getLogger(__name__)

SHARDS = 64
REDIS_FAILURES = (redis.RedisError, OSError)


class RecentItems(ABC):
    def __init__(self, length: int, ttl_seconds: float | None = None):
        self.length = length
        self.ttl_seconds = ttl_seconds

    @abstractmethod
    def push(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Append each item to its user's list, in the order given."""

    @abstractmethod
    def get(self, user_id: int) -> tuple[np.ndarray, bool]:
        """(the user's items, oldest first; whether the backend failed and the list may be short)."""

    @abstractmethod
    def get_many(self, user_ids: np.ndarray) -> list[np.ndarray]:
        """Each user's items, oldest first; raises when the backend fails (for writers)."""

    def close(self) -> None:
        """Release connections; the in-memory lists have none."""


class InMemoryRecentItems(RecentItems):
    def __init__(self, length: int, ttl_seconds: float | None = None):
        super().__init__(length, ttl_seconds)
        self._lists: dict[
            int, tuple[deque, float]
        ] = {}  # user -> (items, expiry on the monotonic clock)
        self._lock = threading.Lock()

    def push(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        now = time.monotonic()
        expiry = now + self.ttl_seconds if self.ttl_seconds else float("inf")
        with self._lock:
            for user, item in zip(
                np.asarray(user_ids, np.uint64).tolist(), np.asarray(item_ids, np.uint64).tolist()
            ):
                entry = self._lists.get(user)
                items = (
                    entry[0] if entry is not None and entry[1] > now else deque(maxlen=self.length)
                )
                items.append(item)
                self._lists[user] = (items, expiry)

    def get(self, user_id: int) -> tuple[np.ndarray, bool]:
        with self._lock:
            items, expiry = self._lists.get(int(user_id), (None, 0.0))
            if items is None or expiry <= time.monotonic():
                return np.empty(0, np.uint64), False
            return np.array(items, dtype=np.uint64), False

    def get_many(self, user_ids: np.ndarray) -> list[np.ndarray]:
        return [self.get(user)[0] for user in np.asarray(user_ids, np.uint64).tolist()]


def recent_key(namespace: str, user_id: int) -> bytes:
    table = f"{namespace}.recent" if namespace else "recent"
    return b"rec:{%s:%d}:%d" % (table.encode(), user_id % SHARDS, user_id)


class RedisRecentItems(RecentItems):
    def __init__(
        self,
        client,
        namespace: str,
        length: int,
        ttl_seconds: float | None = None,
        breaker: CircuitBreaker | None = None,
    ):
        """`breaker`: the embedding store's, so one Redis outage opens one breaker."""
        super().__init__(length, ttl_seconds)
        self.client = client
        self.namespace = namespace
        self.breaker = breaker or CircuitBreaker("redis-recent", counts=REDIS_FAILURES)

    def push(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        grouped: dict[int, list[bytes]] = {}
        for user, item in zip(
            np.asarray(user_ids, np.uint64).tolist(), np.asarray(item_ids, np.uint64)
        ):
            grouped.setdefault(user, []).append(item.astype("<u8").tobytes())
        pipe = self.client.pipeline(transaction=False)
        for user, items in grouped.items():
            key = recent_key(self.namespace, user)
            pipe.rpush(key, *items)
            pipe.ltrim(key, -self.length, -1)
            if self.ttl_seconds:
                pipe.pexpire(key, int(self.ttl_seconds * 1000))
        pipe.execute()

    def get(self, user_id: int) -> tuple[np.ndarray, bool]:
        try:
            values = self.breaker.call(
                self.client.lrange, recent_key(self.namespace, int(user_id)), 0, -1
            )
        except (*REDIS_FAILURES, BreakerOpen) as exc:
            log.warning("recent items of a user unavailable: %s", exc)
            return np.empty(0, np.uint64), True
        return np.frombuffer(b"".join(values), dtype="<u8").astype(np.uint64), False

    def get_many(self, user_ids: np.ndarray) -> list[np.ndarray]:
        pipe = self.client.pipeline(transaction=False)
        for user in np.asarray(user_ids, np.uint64).tolist():
            pipe.lrange(recent_key(self.namespace, user), 0, -1)
        return [
            np.frombuffer(b"".join(values), dtype="<u8").astype(np.uint64)
            for values in pipe.execute()
        ]
