"""The online-learning logs and recent-items lists, run against every backend: in-memory,
Redis standalone and a 3-master Redis Cluster (real servers on loopback)."""

import time
import uuid

import numpy as np
import pytest
import redis

from service.embeddings.recent_items import InMemoryRecentItems, RedisRecentItems, recent_key
from service.embeddings.redis_store import RedisStoreConfig, connect
from service.online.memory_streams import InMemoryEventLog, InMemoryItemUpdateFeed
from service.online.redis_streams import RedisEventLog, RedisItemUpdateFeed
from service.online.streams import EventLogUnavailable, ItemUpdateFeed
from service.schemas import Event
from service.testing.redis_servers import RedisServer

BACKENDS = ["memory", "redis", "cluster"]
backends = pytest.mark.parametrize("backend", BACKENDS)
MAX_ID = 2**64 - 1


@pytest.fixture
def client_of(request):
    made = []

    def client(backend: str):
        server = request.getfixturevalue("redis_server" if backend == "redis" else "redis_cluster")
        made.append(
            connect(RedisStoreConfig(server.url, cluster=backend == "cluster", socket_timeout=5.0))
        )
        return made[-1]

    yield client
    for c in made:
        c.close()


@pytest.fixture
def make_log(client_of):
    def make(backend: str, claim_idle_seconds: float = 30.0):
        if backend == "memory":
            return InMemoryEventLog(claim_idle_seconds)
        log = RedisEventLog(
            client_of(backend),
            f"events-{uuid.uuid4().hex[:8]}",
            "trainer",
            10_000,
            claim_idle_seconds,
        )
        log.ensure_group()
        return log

    return make


def clicks(n: int, user: int = 1) -> list[Event]:
    return [
        Event(user_id=user, item_id=i, type="click", timestamp=1_700_000_000 + i) for i in range(n)
    ]


@backends
def test_events_arrive_once_in_order_with_every_field(backend, make_log):
    log = make_log(backend)
    sent = [
        Event(user_id=MAX_ID, item_id=0, type="impression", timestamp=1_700_000_000.25),
        Event(user_id=0, item_id=MAX_ID, type="purchase"),
        *clicks(5),
    ]
    before = time.time()
    entry_ids = log.append(sent)
    assert len(entry_ids) == len(sent) and log.backlog() == len(sent)
    got = log.read("a", 100, 0)
    assert [e.entry_id for e in got] == entry_ids
    assert [(e.user_id, e.item_id, e.type) for e in got] == [
        (e.user_id, e.item_id, e.type) for e in sent
    ]
    assert got[0].timestamp == 1_700_000_000.25
    assert before - 1 <= got[1].timestamp <= time.time() + 1  # no timestamp: when it arrived
    assert all(before - 1 <= e.appended_at <= time.time() + 1 for e in got)
    log.ack([e.entry_id for e in got])
    assert log.backlog() == 0
    assert log.read("a", 100, 0) == []


@backends
def test_unacked_events_come_back_to_a_restarted_consumer(backend, make_log):
    log = make_log(backend)
    log.append(clicks(10))
    first = log.read("trainer-1", 4, 0)
    assert len(first) == 4
    again = log.read("trainer-1", 100, 0)  # the same name after a crash: its pending entries first
    assert again == first
    log.ack([e.entry_id for e in again])
    rest = log.read("trainer-1", 100, 0)
    assert [e.item_id for e in rest] == list(range(4, 10))
    log.ack([e.entry_id for e in rest])
    assert log.backlog() == 0


@backends
def test_events_left_idle_by_a_dead_consumer_are_claimed_by_another(backend, make_log):
    log = make_log(backend, claim_idle_seconds=0.2)
    log.append(clicks(3))
    taken = log.read("dead", 3, 0)
    assert log.read("alive", 3, 0) == []  # not idle long enough yet
    time.sleep(0.3)
    claimed = log.read("alive", 3, 0)
    assert [e.entry_id for e in claimed] == [e.entry_id for e in taken]
    log.ack([e.entry_id for e in claimed])
    assert log.backlog() == 0


@backends
def test_a_read_waits_for_new_events_and_no_longer(backend, make_log):
    log = make_log(backend)
    started = time.monotonic()
    assert log.read("a", 10, 0.3) == []
    assert 0.25 <= time.monotonic() - started < 3


@backends
def test_every_reader_of_the_update_feed_sees_every_update(backend, client_of):
    feed = (
        InMemoryItemUpdateFeed()
        if backend == "memory"
        else RedisItemUpdateFeed(client_of(backend), uuid.uuid4().hex[:8])
    )
    assert len(feed.read(ItemUpdateFeed.START, 0).item_ids) == 0
    feed.publish(np.array([5, 3, MAX_ID, 3], dtype=np.uint64))
    first = feed.read(ItemUpdateFeed.START, 0)
    assert first.item_ids.tolist() == [3, 5, MAX_ID] and first.published_at > time.time() - 5
    feed.publish(np.array([7], dtype=np.uint64))
    assert feed.read(first.cursor, 0).item_ids.tolist() == [7]
    assert feed.read(ItemUpdateFeed.START, 0).item_ids.tolist() == [
        3,
        5,
        7,
        MAX_ID,
    ]  # another reader
    started = time.monotonic()
    latest = feed.read(ItemUpdateFeed.START, 0)
    assert len(feed.read(latest.cursor, 0.3).item_ids) == 0 and time.monotonic() - started >= 0.25


@backends
def test_recent_items_keep_the_newest_in_order(backend, client_of):
    if backend == "memory":
        recent = InMemoryRecentItems(length=3)
    else:
        recent = RedisRecentItems(client_of(backend), uuid.uuid4().hex[:8], length=3)
    recent.push(np.array([1, 2, 1, 1, 1], np.uint64), np.array([10, 20, 11, 12, MAX_ID], np.uint64))
    items, degraded = recent.get(1)
    assert items.tolist() == [11, 12, MAX_ID] and degraded is False
    assert [r.tolist() for r in recent.get_many(np.array([2, 1, 3], np.uint64))] == [
        [20],
        [11, 12, MAX_ID],
        [],
    ]


def test_redis_layout_of_events_recent_items_and_updates(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    log = RedisEventLog(client, "layout-events", "trainer.ns1")
    log.ensure_group()
    [entry_id] = log.append(
        [Event(user_id=MAX_ID, item_id=42, type="click", timestamp=1_700_000_000.5)]
    )
    [(raw_id, fields)] = client.xrange("layout-events")
    assert raw_id.decode() == entry_id
    assert fields == {
        b"user": b"18446744073709551615",
        b"item": b"42",
        b"type": b"click",
        b"ts": b"1700000000.5",
    }
    assert client.xinfo_groups("layout-events")[0]["name"] == b"trainer.ns1"

    RedisRecentItems(client, "ns1", length=50, ttl_seconds=60).push(
        np.array([130], np.uint64), np.array([7], np.uint64)
    )
    key = recent_key("ns1", 130)
    assert key == b"rec:{ns1.recent:2}:130"
    assert client.lrange(key, 0, -1) == [(7).to_bytes(8, "little")]
    assert 0 < client.pttl(key) <= 60_000

    RedisItemUpdateFeed(client, "ns1").publish(np.array([MAX_ID, 1], np.uint64))
    [(_, update)] = client.xrange("upd:{ns1}")
    assert update == {b"ids": (1).to_bytes(8, "little") + MAX_ID.to_bytes(8, "little")}
    client.close()


def test_an_append_to_a_redis_that_is_down_raises_and_appends_nothing():
    server = RedisServer()
    client = connect(RedisStoreConfig(server.url, socket_timeout=0.1))
    log = RedisEventLog(client, "down-events", "trainer")
    log.ensure_group()
    server.kill()
    try:
        with pytest.raises(EventLogUnavailable):
            log.append(clicks(3))
    finally:
        client.close()
        server.stop()
