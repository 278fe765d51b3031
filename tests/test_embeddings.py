"""The embedding-store contract, run against every backend: in-memory, Redis standalone
and a 3-master Redis Cluster (real servers on loopback, started here)."""

import time
import uuid
from dataclasses import replace

import numpy as np
import pytest

from service.embeddings import InMemoryEmbeddingStore, TableConfig
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig

DIM = 8
BACKENDS = ["memory", "redis", "cluster"]


def tables(**overrides) -> list[TableConfig]:
    default = np.full(DIM, 0.5, dtype=np.float32)
    return [
        replace(TableConfig("user", DIM), **overrides),
        replace(TableConfig("item", DIM, default=default), **overrides),
    ]


@pytest.fixture
def make_store(request):
    """Builds a store of the parametrized backend; each gets its own namespace in Redis."""
    backend = request.param
    made = []

    def make(table_configs=None, cache_entries=0, **config):
        table_configs = table_configs or tables()
        if backend == "memory":
            store = InMemoryEmbeddingStore(table_configs, seed=0)
        else:
            server = request.getfixturevalue(
                "redis_server" if backend == "redis" else "redis_cluster"
            )
            store = RedisEmbeddingStore(
                table_configs,
                RedisStoreConfig(
                    server.url,
                    cluster=backend == "cluster",
                    namespace=uuid.uuid4().hex[:8],
                    cache_entries=cache_entries,
                    **config,
                ),
            )
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


backends = pytest.mark.parametrize("make_store", BACKENDS, indirect=True)


@backends
def test_vectors_read_back_exactly_for_full_64_bit_ids(make_store):
    store = make_store()
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 2**64 - 1, size=5000, dtype=np.uint64, endpoint=True))
    ids = np.concatenate([ids, np.array([0, 2**64 - 1], dtype=np.uint64)])
    vectors = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    store.put_many("user", ids, vectors)
    lookup = store.get_many("user", ids)
    assert lookup.found.all() and not lookup.degraded
    np.testing.assert_array_equal(lookup.vectors, vectors)
    assert store.size("user") == len(ids)


@backends
def test_duplicate_ids_in_one_lookup(make_store):
    store = make_store()
    store.put_many("user", [3, 4], np.array([[1.0] * DIM, [2.0] * DIM], np.float32))
    lookup = store.get_many("user", [4, 3, 4, 9, 4])
    assert lookup.found.tolist() == [True, True, True, False, True]
    assert lookup.vectors[:, 0].tolist() == [2.0, 1.0, 2.0, 0.0, 2.0]


@backends
def test_unknown_ids_get_the_table_default(make_store):
    store = make_store()
    store.put_many("item", [1], np.ones((1, DIM), np.float32))
    lookup = store.get_many("item", [1, 2])
    assert lookup.found.tolist() == [True, False]
    np.testing.assert_array_equal(lookup.vectors[1], np.full(DIM, 0.5))
    np.testing.assert_array_equal(store.get_many("user", [9]).vectors[0], np.zeros(DIM))


@backends
def test_tables_are_separate_and_delete_removes(make_store):
    store = make_store()
    store.put_many("user", [7], np.ones((1, DIM), np.float32))
    assert not store.get_many("item", [7]).found[0]
    assert store.delete("user", [7, 8]) == 1
    assert not store.get_many("user", [7]).found[0]


@backends
def test_scan_returns_every_row(make_store):
    store = make_store()
    ids = np.arange(10, 30, dtype=np.uint64)
    store.put_many("user", ids, np.arange(20 * DIM, dtype=np.float32).reshape(20, DIM))
    store.put_many("item", [10], np.ones((1, DIM), np.float32))
    seen = {}
    for batch_ids, batch_vectors in store.scan("user", batch_size=3):
        seen.update(zip(batch_ids.tolist(), batch_vectors[:, 0].tolist()))
    assert seen == {10 + i: float(i * DIM) for i in range(20)}


@backends
def test_rows_expire_when_not_written_for_the_ttl(make_store):
    store = make_store(tables(ttl_seconds=0.5, ttl_jitter=0.1))
    store.put_many("user", [1, 2], np.ones((2, DIM), np.float32))
    time.sleep(0.3)
    assert store.get_many("user", [1, 2]).found.all()  # a read does not refresh the TTL
    store.put_many("user", [2], np.ones((1, DIM), np.float32))  # a write does
    time.sleep(0.35)
    assert store.get_many("user", [1, 2]).found.tolist() == [False, True]
    assert store.size("user") == 1


@backends
def test_admission_after_threshold_occurrences(make_store):
    store = make_store(tables(admission_threshold=3))
    assert store.record("user", [5, 6]).tolist() == [False, False]
    assert store.record("user", [5]).tolist() == [False]
    assert store.record("user", [5, 6]).tolist() == [True, False]
    store.put_many("user", [7], np.ones((1, DIM), np.float32))
    assert store.record("user", [7]).tolist() == [True]  # holds a row already
    assert store.record("item", [5]).tolist() == [False]  # counts are per table


@backends
def test_probabilistic_admission_admits_in_proportion_to_count(make_store):
    store = make_store(tables(admission_threshold=10, admission_probabilistic=True))
    admitted = store.record("user", np.arange(1, 3001, dtype=np.uint64))
    assert 0.06 < admitted.mean() < 0.14  # p = 1/10


@backends
def test_counts_are_forgotten_after_the_window(make_store):
    store = make_store(tables(admission_threshold=2, count_window_seconds=0.3))
    store.record("user", [8])
    time.sleep(0.5)
    assert store.record("user", [8]).tolist() == [False]


@backends
def test_fp16_tables_store_half_precision(make_store):
    store = make_store(tables(dtype="float16"))
    vectors = np.random.default_rng(1).normal(size=(4, DIM)).astype(np.float32)
    store.put_many("user", [1, 2, 3, 4], vectors)
    np.testing.assert_array_equal(
        store.get_many("user", [1, 2, 3, 4]).vectors, vectors.astype(np.float16).astype(np.float32)
    )


@backends
@pytest.mark.parametrize(
    ("ids", "vectors", "message"),
    [
        ([1], np.ones((1, DIM + 1)), "takes"),
        ([1], np.full((1, DIM), np.nan), "NaN"),
        ([1], np.full((1, DIM), np.inf), "NaN or Inf"),
        ([-1], np.ones((1, DIM)), "outside"),
        ([2**64], np.ones((1, DIM)), "outside"),
    ],
)
def test_bad_writes_are_refused(make_store, ids, vectors, message):
    store = make_store()
    with pytest.raises(ValueError, match=message):
        store.put_many("user", ids, vectors)
    assert store.size("user") == 0


@backends
def test_unknown_table_is_named_in_the_error(make_store):
    store = make_store()
    with pytest.raises(KeyError, match="no embedding table 'session'"):
        store.get_many("session", [1])


@backends
def test_a_million_random_64_bit_ids_never_collide(make_store):
    """Collisionless: every id keeps its own row, none overwritten by another."""
    store = make_store([TableConfig("big", 2)])
    rng = np.random.default_rng(42)
    ids = np.unique(rng.integers(0, 2**64 - 1, size=1_000_000, dtype=np.uint64, endpoint=True))
    vectors = rng.normal(size=(len(ids), 2)).astype(np.float32)
    for start in range(0, len(ids), 50_000):
        store.put_many("big", ids[start : start + 50_000], vectors[start : start + 50_000])
    for start in range(0, len(ids), 50_000):
        lookup = store.get_many("big", ids[start : start + 50_000])
        assert lookup.found.all()
        np.testing.assert_array_equal(lookup.vectors, vectors[start : start + 50_000])
    assert store.size("big") == len(ids)
