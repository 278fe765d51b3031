"""Embedding store on Redis or Redis Cluster; the key layout is `service.embeddings.layout`.

Request path: dedupe the ids, serve what the local cache holds, fetch the rest with one
MGET (on Cluster, one MGET per slot, pipelined per node by `mget_nonatomic`), decode with
`numpy.frombuffer`. Socket timeouts are short and there is at most one retry; a breaker
stops calling a Redis that keeps failing. A failed lookup returns default vectors and
`degraded=True` instead of raising, so requests keep being answered; writes raise, so a
writer (the online trainer) knows its update did not land.
"""

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from service.breaker import BreakerOpen, CircuitBreaker
from service.embeddings import layout
from service.embeddings.cache import LocalCache
from service.embeddings.store import EmbeddingStore, Lookup, TableConfig, as_ids, observe_lookup
from service.settings import Settings

log = logging.getLogger(__name__)

Client = redis.Redis | RedisCluster
REDIS_FAILURES = (redis.RedisError, OSError)
BULK_SOCKET_TIMEOUT = 5.0  # seconds: bulk work waits out a busy server instead of failing


@dataclass(frozen=True)
class RedisStoreConfig:
    url: str
    cluster: bool = False
    namespace: str = ""  # prefixes table names, e.g. one artifact version's tables
    socket_timeout: float = 0.1
    retries: int = 1
    breaker_failures: int = 5  # consecutive failures that open the breaker
    breaker_reset_seconds: float = 2.0  # an open breaker lets one call through after this
    cache_entries: int = 100_000  # 0 turns the local cache off
    cache_ttl_seconds: float = 1.0
    max_connections: int = 64

    @classmethod
    def from_settings(
        cls, settings: Settings, namespace: str = "", bulk: bool = False
    ) -> "RedisStoreConfig":
        """The configured Redis (RECSYS_REDIS_*), for the request path, or for `bulk` work (table
        loads and exports, the online trainer): patient sockets and no local cache in front of
        rows it rewrites."""
        if settings.redis_url is None:
            raise ValueError("RECSYS_REDIS_URL is not set")
        return cls(
            settings.redis_url,
            cluster=settings.redis_cluster,
            namespace=namespace,
            socket_timeout=max(settings.redis_socket_timeout, BULK_SOCKET_TIMEOUT)
            if bulk
            else settings.redis_socket_timeout,
            cache_entries=0 if bulk else settings.embedding_cache_entries,
            cache_ttl_seconds=settings.embedding_cache_ttl_seconds,
        )


def connect(config: RedisStoreConfig) -> Client:
    options = {
        "socket_timeout": config.socket_timeout,
        "socket_connect_timeout": config.socket_timeout,
        "retry": Retry(NoBackoff(), config.retries),
        "max_connections": config.max_connections,
    }
    if config.cluster:
        return RedisCluster.from_url(config.url, **options)
    return redis.Redis.from_url(config.url, **options)


SMALL_BATCH = 256  # below this a dict dedupes faster than np.unique's fixed cost


def dedupe(ids: np.ndarray) -> tuple[list[int], np.ndarray | list[int] | None]:
    """Distinct ids and each requested id's position among them; None when the distinct ids
    are the request itself, in order."""
    if len(ids) <= SMALL_BATCH:
        positions: dict[int, int] = {}
        inverse = [positions.setdefault(item, len(positions)) for item in ids.tolist()]
        return list(positions), (inverse if len(positions) < len(ids) else None)
    distinct, inverse = np.unique(ids, return_inverse=True)  # sorted: the inverse is always needed
    return distinct.tolist(), inverse


class RedisEmbeddingStore(EmbeddingStore):
    def __init__(
        self, tables: list[TableConfig], config: RedisStoreConfig, client: Client | None = None
    ):
        super().__init__(tables)
        self.config = config
        self.client = client if client is not None else connect(config)
        self.cluster = isinstance(self.client, RedisCluster)
        self.cache = (
            LocalCache(config.cache_entries, config.cache_ttl_seconds)
            if config.cache_entries
            else None
        )
        self.breaker = CircuitBreaker(
            "redis", config.breaker_failures, config.breaker_reset_seconds, counts=REDIS_FAILURES
        )
        self._random = random.Random()
        self.backend = "redis_cluster" if self.cluster else "redis"
        self._key_makers: dict[str, layout.KeyMaker] = {}

    def qualified(self, table: str) -> str:
        self.table(table)
        return f"{self.config.namespace}.{table}" if self.config.namespace else table

    def keys(self, table: str, ids: list[int]) -> list[bytes]:
        maker = self._key_makers.get(table)
        if maker is None:
            maker = self._key_makers[table] = layout.KeyMaker(
                self.qualified(table), self.table(table).shards
            )
        return maker(ids)

    def _mget(self, keys: list[bytes]) -> list[bytes | None]:
        if self.cluster:
            return self.client.mget_nonatomic(keys)
        return self.client.mget(keys)

    def _fetch(self, table: str, ids: list[int]) -> tuple[np.ndarray, np.ndarray, bool]:
        """(vectors, found, failed) straight from Redis; a failure reads as not found."""
        config = self.table(table)
        try:
            values = self.breaker.call(self._mget, self.keys(table, ids))
        except (*REDIS_FAILURES, BreakerOpen) as exc:
            log.warning("embedding lookup in %s failed: %s", table, exc)
            return np.zeros((len(ids), config.dim), np.float32), np.zeros(len(ids), bool), True
        vectors, found = layout.decode_rows(values, config.dim, config.dtype)
        return vectors, found, False

    def get_many(self, table: str, ids) -> Lookup:
        started = time.perf_counter()
        config = self.table(table)
        requested = as_ids(ids)
        distinct, inverse = dedupe(requested)
        if self.cache is not None:
            vectors, found, cached, degraded = self.cache.get_many(
                table,
                distinct,
                config.dim,
                lambda missing: self._fetch(table, missing),
                2 * self.config.socket_timeout,
            )
        else:
            (vectors, found, degraded), cached = (
                self._fetch(table, distinct),
                np.zeros(len(distinct), bool),
            )
        if not found.all():
            vectors[~found] = config.default_vector()
        observe_lookup(self.backend, table, found, cached, degraded, time.perf_counter() - started)
        if inverse is None:
            return Lookup(vectors, found, degraded)
        return Lookup(vectors[inverse], found[inverse], degraded)

    def put_many(self, table: str, ids, vectors: np.ndarray) -> None:
        config = self.table(table)
        ids = as_ids(ids)
        values = layout.encode_rows(self._check_vectors(table, ids, vectors), config.dtype)
        keys = self.keys(table, ids.tolist())
        pipe = self.client.pipeline(transaction=False)
        for key, value in zip(keys, values):
            ttl = config.ttl_with_jitter(self._random)
            pipe.set(key, value, px=None if ttl is None else max(1, int(ttl * 1000)))
        pipe.execute()
        if self.cache is not None:
            self.cache.invalidate(table, ids.tolist())

    def invalidate(self, table: str, ids) -> None:
        if self.cache is not None:
            self.cache.invalidate(table, as_ids(ids).tolist())

    def delete(self, table: str, ids) -> int:
        ids = as_ids(ids).tolist()
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys(table, ids):
            pipe.delete(key)
        removed = sum(pipe.execute())
        if self.cache is not None:
            self.cache.invalidate(table, ids)
        return removed

    def counts(self, table: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        config = self.table(table)
        name = self.qualified(table)
        pipe = self.client.pipeline(transaction=False)
        for item in as_ids(ids).tolist():
            pipe.get(layout.count_key(name, config.shards, item))
            pipe.exists(layout.vector_key(name, config.shards, item))
        replies = pipe.execute()
        counted = np.array([int(value or 0) for value in replies[0::2]], dtype=np.int64)
        return counted, np.array(replies[1::2], dtype=bool)

    def add_counts(self, table: str, ids) -> None:
        config = self.table(table)
        name = self.qualified(table)
        window_ms = int(config.count_window_seconds * 1000)
        distinct, occurrences = np.unique(as_ids(ids), return_counts=True)
        pipe = self.client.pipeline(transaction=False)
        for item, times in zip(distinct.tolist(), occurrences.tolist()):
            counter = layout.count_key(name, config.shards, item)
            pipe.incrby(counter, times)
            pipe.pexpire(counter, window_ms, nx=True)  # the window starts at the first occurrence
        pipe.execute()

    def scan(self, table: str, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        config = self.table(table)
        pattern = layout.vector_pattern(self.qualified(table))
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= batch_size:
                yield from self._read(batch, config)
                batch = []
        if batch:
            yield from self._read(batch, config)

    def _read(
        self, keys: list[bytes], config: TableConfig
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        vectors, found = layout.decode_rows(self._mget(keys), config.dim, config.dtype)
        ids = np.array([layout.id_of_key(k) for k in keys], dtype=np.uint64)
        if found.any():  # a key that expired between SCAN and MGET is skipped
            yield ids[found], vectors[found]

    def close(self) -> None:
        self.client.close()
