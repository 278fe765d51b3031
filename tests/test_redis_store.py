"""What only the Redis backends have: the byte layout, cluster spread, the local cache,
and behaviour while Redis is down."""

import struct
import threading
import time

import numpy as np
import pytest
import redis

from service.embeddings import TableConfig
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig
from service.testing.redis_servers import RedisServer


def store_on(server, table_configs, cluster=False, **config) -> RedisEmbeddingStore:
    options = {"namespace": "ns", "cache_entries": 0, **config}
    return RedisEmbeddingStore(
        table_configs, RedisStoreConfig(server.url, cluster=cluster, **options)
    )


def test_key_and_value_bytes_follow_the_spec(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    store = store_on(
        redis_server,
        [
            TableConfig("user", 3, ttl_seconds=100, ttl_jitter=0.1),
            TableConfig("half", 3, dtype="float16"),
        ],
    )
    store.put_many("user", [69], np.array([[1.0, -2.0, 0.5]], np.float32))
    store.put_many("half", [2**64 - 1], np.array([[1.0, -2.0, 0.5]], np.float32))
    assert client.get(b"emb:{ns.user:5}:69") == struct.pack("<3f", 1.0, -2.0, 0.5)
    assert client.get(b"emb:{ns.half:63}:18446744073709551615") == struct.pack(
        "<3e", 1.0, -2.0, 0.5
    )
    assert 100_000 - 500 <= client.pttl(b"emb:{ns.user:5}:69") <= 110_000
    assert client.pttl(b"emb:{ns.half:63}:18446744073709551615") == -1  # no TTL configured
    store.record("user", [69])
    store.record("user", [69])
    assert client.get(b"cnt:{ns.user:5}:69") == b"2"
    assert 0 < client.pttl(b"cnt:{ns.user:5}:69") <= 86_400_000
    assert sorted(client.keys()) == [
        b"cnt:{ns.user:5}:69",
        b"emb:{ns.half:63}:18446744073709551615",
        b"emb:{ns.user:5}:69",
    ]
    store.close()
    client.close()


def test_a_value_of_the_wrong_length_reads_as_absent(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.set(b"emb:{ns.user:1}:1", b"\x00" * 7)
    store = store_on(redis_server, [TableConfig("user", 3)])
    assert store.get_many("user", [1]).found.tolist() == [False]
    store.close()
    client.close()


def test_a_table_spreads_over_every_cluster_node_one_slot_per_shard(redis_cluster):
    store = store_on(redis_cluster, [TableConfig("user", 2, shards=64)], cluster=True)
    ids = np.arange(1, 2001, dtype=np.uint64)
    store.put_many("user", ids, np.ones((len(ids), 2), np.float32))
    per_node = [redis.Redis(port=n.port).dbsize() for n in redis_cluster.nodes]
    assert all(count > 0 for count in per_node) and sum(per_node) >= len(ids)
    client = redis.Redis(port=redis_cluster.nodes[0].port)
    slots = {
        client.cluster("keyslot", key) for key in store.keys("user", [5, 69, 133])
    }  # one shard
    assert len(slots) == 1
    all_slots = {client.cluster("keyslot", key) for key in store.keys("user", list(range(64)))}
    assert len(all_slots) == 64
    client.close()
    store.close()


def test_local_cache_serves_hot_ids_for_its_ttl(redis_server):
    store = store_on(
        redis_server,
        [TableConfig("user", 2)],
        namespace="cache",
        cache_entries=1000,
        cache_ttl_seconds=0.4,
    )
    other = store_on(redis_server, [TableConfig("user", 2)], namespace="cache")
    store.put_many("user", [1], np.ones((1, 2), np.float32))
    assert store.get_many("user", [1, 2]).found.tolist() == [True, False]
    other.delete("user", [1])
    other.put_many("user", [2], np.ones((1, 2), np.float32))
    assert store.get_many("user", [1, 2]).found.tolist() == [True, False]  # both from the cache
    time.sleep(0.5)
    assert store.get_many("user", [1, 2]).found.tolist() == [False, True]
    store.put_many("user", [2], np.full((1, 2), 3.0, np.float32))  # own writes invalidate at once
    assert store.get_many("user", [2]).vectors[0, 0] == 3.0
    store.close()
    other.close()


def test_concurrent_misses_for_one_id_cost_one_round_trip(redis_server):
    store = store_on(
        redis_server,
        [TableConfig("user", 2)],
        namespace="flight",
        cache_entries=1000,
        cache_ttl_seconds=5,
    )
    store.put_many("user", np.arange(1, 101, dtype=np.uint64), np.ones((100, 2), np.float32))
    calls = []
    real_mget = store._mget

    def slow_mget(keys):
        calls.append(len(keys))
        time.sleep(0.05)
        return real_mget(keys)

    store._mget = slow_mget
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                store.get_many("user", np.arange(1, 101, dtype=np.uint64))
            )
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [100]
    assert len(results) == 8 and all(r.found.all() for r in results)
    store.close()


def test_lookups_degrade_while_redis_is_down_and_recover_when_it_returns():
    server = RedisServer()
    try:
        store = store_on(
            server,
            [TableConfig("user", 2, default=np.array([9.0, 9.0]))],
            breaker_failures=3,
            breaker_reset_seconds=0.5,
        )
        store.put_many("user", [1], np.ones((1, 2), np.float32))
        assert not store.get_many("user", [1]).degraded
        server.kill()
        started = time.monotonic()
        for _ in range(10):
            lookup = store.get_many("user", [1])
            assert lookup.degraded and not lookup.found[0]
            np.testing.assert_array_equal(lookup.vectors[0], [9.0, 9.0])
        assert time.monotonic() - started < 5  # short timeouts and the open breaker: no hang
        assert store.breaker.state == "open"
        with pytest.raises((redis.RedisError, OSError)):
            store.put_many("user", [2], np.ones((1, 2), np.float32))  # a writer must know
        server.start()  # same port, empty: the data did not survive (no persistence here)
        time.sleep(0.6)
        store.put_many("user", [1], np.ones((1, 2), np.float32))
        lookup = store.get_many("user", [1])
        assert not lookup.degraded and lookup.found[0]
        store.close()
    finally:
        server.stop()
