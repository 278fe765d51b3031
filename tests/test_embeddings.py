"""The embedding-store contract, run against every backend."""

import numpy as np
import pytest

from service.embeddings import InMemoryEmbeddingStore, TableConfig

DIM = 8


def memory_store(tables):
    return InMemoryEmbeddingStore(tables)


@pytest.fixture(params=[memory_store], ids=["memory"])
def store(request):
    default = np.full(DIM, 0.5, dtype=np.float32)
    return request.param([TableConfig("user", DIM), TableConfig("item", DIM, default=default)])


def test_vectors_read_back_exactly_for_full_64_bit_ids(store):
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 2**64 - 1, size=5000, dtype=np.uint64, endpoint=True))
    ids = np.concatenate([ids, np.array([0, 2**64 - 1], dtype=np.uint64)])
    vectors = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    store.put_many("user", ids, vectors)
    lookup = store.get_many("user", ids)
    assert lookup.found.all()
    np.testing.assert_array_equal(lookup.vectors, vectors)
    assert store.size("user") == len(ids)


def test_unknown_ids_get_the_table_default(store):
    store.put_many("item", [1], np.ones((1, DIM), np.float32))
    lookup = store.get_many("item", [1, 2])
    assert lookup.found.tolist() == [True, False]
    np.testing.assert_array_equal(lookup.vectors[1], np.full(DIM, 0.5))
    np.testing.assert_array_equal(store.get_many("user", [9]).vectors[0], np.zeros(DIM))


def test_tables_are_separate_and_delete_removes(store):
    store.put_many("user", [7], np.ones((1, DIM), np.float32))
    assert not store.get_many("item", [7]).found[0]
    assert store.delete("user", [7, 8]) == 1
    assert not store.get_many("user", [7]).found[0]


def test_scan_returns_every_row(store):
    ids = np.arange(10, 20, dtype=np.uint64)
    store.put_many("user", ids, np.arange(10 * DIM, dtype=np.float32).reshape(10, DIM))
    seen = {}
    for batch_ids, batch_vectors in store.scan("user", batch_size=3):
        seen.update(zip(batch_ids.tolist(), batch_vectors[:, 0].tolist()))
    assert seen == {10 + i: float(i * DIM) for i in range(10)}


@pytest.mark.parametrize(
    ("ids", "vectors", "message"),
    [
        ([1], np.ones((1, DIM + 1)), "takes"),
        ([1], np.full((1, DIM), np.nan), "NaN"),
        ([-1], np.ones((1, DIM)), "outside"),
        ([2**64], np.ones((1, DIM)), "outside"),
    ],
)
def test_bad_writes_are_refused(store, ids, vectors, message):
    with pytest.raises(ValueError, match=message):
        store.put_many("user", ids, vectors)
    assert store.size("user") == 0


def test_unknown_table_is_named_in_the_error(store):
    with pytest.raises(KeyError, match="no embedding table 'session'"):
        store.get_many("session", [1])
