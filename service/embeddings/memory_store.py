"""In-process embedding store: the embedded default and the test double for the others.

Rows keep the dtype the table declares (fp16 tables round like the Redis ones do), expire
on the table's TTL, and occurrence counts live in a bounded cache that forgets them after
the count window.
"""

import random
import threading
import time
from collections.abc import Iterator

import numpy as np
from cachetools import TTLCache

from service.embeddings.layout import DTYPES
from service.embeddings.store import EmbeddingStore, Lookup, TableConfig, as_ids, observe_lookup

MAX_COUNTED_IDS = 1_000_000


class InMemoryEmbeddingStore(EmbeddingStore):
    def __init__(self, tables: list[TableConfig], seed: int | None = None):
        super().__init__(tables)
        # id -> (row in the table's dtype, expiry on the monotonic clock or inf)
        self._rows: dict[str, dict[int, tuple[np.ndarray, float]]] = {t.name: {} for t in tables}
        self._counts = {
            t.name: TTLCache(MAX_COUNTED_IDS, t.count_window_seconds, timer=time.monotonic)
            for t in tables
        }
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._rng = np.random.default_rng(seed)

    def get_many(self, table: str, ids) -> Lookup:
        started = time.perf_counter()
        config = self.table(table)
        keys = as_ids(ids).tolist()
        rows = self._rows[table]
        vectors = np.empty((len(keys), config.dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        default = config.default_vector()
        now = time.monotonic()
        with self._lock:
            for i, key in enumerate(keys):
                entry = rows.get(key)
                if entry is not None and entry[1] <= now:
                    del rows[key]
                    entry = None
                if entry is None:
                    vectors[i] = default
                else:
                    vectors[i] = entry[0]
                    found[i] = True
        observe_lookup(
            "memory", table, found, np.zeros(len(keys), bool), False, time.perf_counter() - started
        )
        return Lookup(vectors, found)

    def put_many(self, table: str, ids, vectors: np.ndarray) -> None:
        keys = as_ids(ids)
        config = self.table(table)
        stored = self._check_vectors(table, keys, vectors).astype(DTYPES[config.dtype])
        rows = self._rows[table]
        with self._lock:
            now = time.monotonic()
            for key, vector in zip(keys.tolist(), stored):
                ttl = config.ttl_with_jitter(self._random)
                rows[key] = (vector.copy(), now + ttl if ttl is not None else float("inf"))

    def delete(self, table: str, ids) -> int:
        self.table(table)
        rows = self._rows[table]
        with self._lock:
            return sum(rows.pop(key, None) is not None for key in as_ids(ids).tolist())

    def counts(self, table: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.table(table)
        keys = as_ids(ids).tolist()
        now = time.monotonic()
        with self._lock:
            counted = np.array([self._counts[table].get(key, 0) for key in keys], dtype=np.int64)
            rows = [self._rows[table].get(key) for key in keys]
        return counted, np.array([row is not None and row[1] > now for row in rows], dtype=bool)

    def add_counts(self, table: str, ids) -> None:
        self.table(table)
        counts = self._counts[table]
        with self._lock:
            for key in as_ids(ids).tolist():
                counts[key] = counts.get(key, 0) + 1

    def scan(self, table: str, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        config = self.table(table)
        now = time.monotonic()
        with self._lock:
            live = [(k, row) for k, (row, expires) in self._rows[table].items() if expires > now]
        for start in range(0, len(live), batch_size):
            chunk = live[start : start + batch_size]
            ids = np.array([k for k, _ in chunk], dtype=np.uint64)
            yield (
                ids,
                np.stack([row for _, row in chunk]).astype(np.float32).reshape(-1, config.dim),
            )
