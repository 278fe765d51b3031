"""The embedding-store interface every backend implements.

Keys are raw unsigned 64-bit ids: no id is hashed into a shared row, so two ids never
share a vector (Monolith's collisionless table). Rows expire when not written for the
table's TTL. A frequency filter decides when a new id deserves a row of its own; until
then, and for any id the table does not hold, a lookup returns the table's default vector
and says so in `Lookup.found`.
"""

import functools
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.embeddings.layout import check_table_name
from service.metrics import (
    EMBEDDING_ADMISSIONS,
    EMBEDDING_BATCH_IDS,
    EMBEDDING_LOOKUP_LATENCY,
    EMBEDDING_LOOKUPS,
)


@dataclass(frozen=True)
class TableConfig:
    name: str
    dim: int
    dtype: Literal["float32", "float16"] = "float32"
    ttl_seconds: float | None = None  # None: rows never expire
    ttl_jitter: float = (
        0.1  # a row lives ttl x (1 + U(0, jitter)), so a batch does not expire at once
    )
    admission_threshold: int = 1  # occurrences before an id gets its own row
    admission_probabilistic: bool = False  # below the threshold, admit with p = count / threshold
    count_window_seconds: float = 86_400.0  # occurrence counts are forgotten after this
    shards: int = 64  # Redis: hash-tag groups per table, spread over cluster slots
    default: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_table_name(self.name)
        if self.dim < 1 or self.shards < 1 or self.admission_threshold < 1:
            raise ValueError(
                f"table {self.name!r}: dim, shards and admission_threshold must be >= 1"
            )
        if self.ttl_seconds is not None and self.ttl_seconds <= 0:
            raise ValueError(f"table {self.name!r}: ttl_seconds must be positive or None")

    def default_vector(self) -> np.ndarray:
        if self.default is None:
            return np.zeros(self.dim, dtype=np.float32)
        return np.asarray(self.default, dtype=np.float32).reshape(self.dim)

    def ttl_with_jitter(self, rng: random.Random) -> float | None:
        if self.ttl_seconds is None:
            return None
        return self.ttl_seconds * (1.0 + rng.uniform(0.0, self.ttl_jitter))

    def passes_filter(self, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        admitted = counts >= self.admission_threshold
        if self.admission_probabilistic:
            admitted |= rng.random(len(counts)) < counts / self.admission_threshold
        return admitted


@dataclass
class Lookup:
    vectors: np.ndarray  # (n, dim) float32, default rows where not found
    found: np.ndarray  # (n,) bool
    degraded: bool = False  # the backend failed; every row not served from cache is a default


def as_ids(ids) -> np.ndarray:
    """Ids as a 1-d uint64 array; refuses negatives and values past 2**64 - 1."""
    if isinstance(ids, np.ndarray) and ids.dtype == np.uint64:
        return ids.reshape(-1)
    values = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    for value in values:
        if not 0 <= int(value) < 2**64:
            raise ValueError(f"id {value} is outside the unsigned 64-bit range")
    return np.array(values, dtype=np.uint64).reshape(-1)


@functools.cache
def _lookup_series(backend: str, table: str):
    """The labelled series of a (backend, table), resolved once: `labels()` costs a lock."""
    return (
        *(
            EMBEDDING_LOOKUPS.labels(table, result)
            for result in ("hit", "cache_hit", "miss", "error")
        ),
        EMBEDDING_BATCH_IDS.labels(backend),
        EMBEDDING_LOOKUP_LATENCY.labels(backend),
    )


def observe_lookup(
    backend: str, table: str, found: np.ndarray, cached: np.ndarray, degraded: bool, seconds: float
) -> None:
    """Metrics of one batched lookup over distinct ids (on every request: counted with
    `count_nonzero` and no zero increments, a few microseconds less per lookup)."""
    hit, cache_hit, miss, error, batch, latency = _lookup_series(backend, table)
    n_found = np.count_nonzero(found)
    n_cached = np.count_nonzero(found & cached) if np.count_nonzero(cached) else 0
    if n_cached:
        cache_hit.inc(n_cached)
    if n_found > n_cached:
        hit.inc(n_found - n_cached)
    if len(found) > n_found:
        (error if degraded else miss).inc(len(found) - n_found)
    batch.observe(len(found))
    latency.observe(seconds)


def observe_admission(table: str, admitted: np.ndarray) -> None:
    EMBEDDING_ADMISSIONS.labels(table, "admitted").inc(int(admitted.sum()))
    EMBEDDING_ADMISSIONS.labels(table, "rejected").inc(int((~admitted).sum()))


class EmbeddingStore(ABC):
    def __init__(self, tables: list[TableConfig]):
        self.tables = {t.name: t for t in tables}
        self._rng = (
            np.random.default_rng()
        )  # probabilistic admission, unless the caller brings its own

    def table(self, name: str) -> TableConfig:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"no embedding table {name!r}; tables: {sorted(self.tables)}") from None

    @abstractmethod
    def get_many(self, table: str, ids) -> Lookup: ...

    @abstractmethod
    def put_many(self, table: str, ids, vectors: np.ndarray) -> None:
        """Write rows (admitted or not: callers ask `record` first) with a fresh TTL."""

    @abstractmethod
    def delete(self, table: str, ids) -> int:
        """Remove ids; returns how many were present."""

    @abstractmethod
    def counts(self, table: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For distinct `ids`: (occurrences counted so far, whether each holds a row); reads only."""

    @abstractmethod
    def add_counts(self, table: str, ids) -> None:
        """Count one occurrence of each id (an id listed twice counts twice)."""

    def admission(self, table: str, ids, rng: np.random.Generator | None = None) -> np.ndarray:
        """Which of `ids` would be admitted if counted now, in order (an id's second
        occurrence sees the first counted); reads only: `add_counts` does the counting."""
        ids = as_ids(ids)
        distinct, inverse = np.unique(ids, return_inverse=True)
        counted, held = self.counts(table, distinct)
        order = np.argsort(inverse, kind="stable")
        rank = np.empty(
            len(ids), dtype=np.int64
        )  # 1 for an id's first occurrence, 2 for its second...
        grouped = inverse[order]
        rank[order] = np.arange(len(ids)) - np.searchsorted(grouped, grouped, side="left") + 1
        return self._admit(
            table, counted[inverse] + rank, held[inverse], self._rng if rng is None else rng
        )

    def record(self, table: str, ids) -> np.ndarray:
        """Count one occurrence of each id; returns which ids are admitted (they hold a row
        already or now pass the table's frequency filter)."""
        admitted = self.admission(table, ids)
        self.add_counts(table, ids)
        return admitted

    def size(self, table: str) -> int:
        """Rows the table holds. Scans the whole table: for tools, not requests."""
        return sum(len(ids) for ids, _ in self.scan(table))

    @abstractmethod
    def scan(self, table: str, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, vectors) the table holds, in batches."""

    def _admit(
        self, table: str, counts: np.ndarray, held: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Admitted: holds a row already, or its count passes the table's filter."""
        admitted = held | self.table(table).passes_filter(counts, rng)
        observe_admission(table, admitted)
        return admitted

    def invalidate(self, table: str, ids) -> None:
        """Forget what a local cache holds for these ids: another process rewrote them."""

    def close(self) -> None:
        """Release connections; the in-memory store has none."""

    def _check_vectors(self, table: str, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        config = self.table(table)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), config.dim):
            raise ValueError(
                f"table {table!r} takes ({len(ids)}, {config.dim}) vectors, got {vectors.shape}"
            )
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or Inf")
        return vectors
