"""Online learning end to end: events over HTTP and gRPC, the trainer in process (embedded)
and as its own `recsys online-train` process on Redis, a brand-new item reaching similar
users without a restart, and a trainer that crashes losing nothing."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from google.protobuf.timestamp_pb2 import Timestamp

from service.api.embedded import build_app
from service.artifact_tables import in_memory_store, open_store
from service.bundle import ModelBundle
from service.embeddings.recent_items import InMemoryRecentItems, RedisRecentItems
from service.embeddings.redis_store import RedisStoreConfig, connect
from service.embeddings.tables import ITEM_TABLE
from service.online.memory_streams import InMemoryEventLog, InMemoryItemUpdateFeed
from service.online.redis_streams import RedisEventLog, RedisItemUpdateFeed
from service.online.trainer import OnlineTrainer, OnlineTrainerConfig
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.schemas import Event
from service.settings import Settings
from service.testing.redis_servers import free_port
from service.testing.stores import DegradedReads

BIN = Path(sys.executable).parent
NEW_ITEM = 2**63 + 12345  # no catalog attributes, no vector: only clicks will place it
DEADLINE_SECONDS = 15.0


def category_fans(
    dataset, clickers: int = 3, minimum: int = 10
) -> tuple[list[int], list[int], list[int]]:
    """(users who will click, other fans of the same category, users with none of it):
    fans are users with over half their interactions in one category."""
    frame = dataset.interactions.merge(dataset.items, on="item_id")
    share = frame.groupby(["user_id", "category"]).size().unstack(fill_value=0)
    share = share.div(share.sum(axis=1), axis=0)
    for category in share.columns:
        fans = share.index[share[category] > 0.5].tolist()
        if len(fans) >= clickers + minimum:
            strangers = share.index[share[category] == 0].tolist()
            return fans[:clickers], fans[clickers:], strangers
    raise AssertionError("no category with enough fans in the test data")


def rank_of(http, user: int, item: int, candidates: int = 50) -> int:
    body = http.post(
        "/v1/candidates", json={"user_id": int(user), "k": 10, "candidates": candidates}
    ).json()
    ids = [c["item_id"] for c in body["candidates"]]
    return ids.index(item) if item in ids else candidates


def wait_until_fans_retrieve(http, fans: list[int], item: int) -> list[int]:
    """Ranks of `item` for each fan, once most fans get it in their top 50 (or at the deadline)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        ranks = [rank_of(http, u, item) for u in fans]
        if np.mean(np.array(ranks) < 50) >= 0.8 or time.monotonic() > deadline:
            return ranks
        time.sleep(0.2)


def assert_new_item_reaches_similar_users(http, dataset) -> None:
    # A new row's steps are damped until it has some evidence: a handful of clicks, not one.
    clickers, fans, strangers = category_fans(dataset, clickers=8)
    assert all(rank_of(http, u, NEW_ITEM) == 50 for u in fans)  # unknown before the clicks
    events = [{"user_id": int(u), "item_id": NEW_ITEM, "type": "click"} for u in clickers]
    assert http.post("/v1/events", json={"events": events}).status_code == 202
    ranks = wait_until_fans_retrieve(http, fans, NEW_ITEM)
    assert np.mean(np.array(ranks) < 50) >= 0.8, ranks
    stranger_ranks = [rank_of(http, u, NEW_ITEM) for u in strangers[:20]]
    assert np.median(ranks) < np.median(stranger_ranks), (ranks, stranger_ranks)
    # The clickers' own answers now leave the item out: it is in their history.
    for user in clickers:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while rank_of(http, user, NEW_ITEM) < 50 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rank_of(http, user, NEW_ITEM) == 50


@pytest.fixture(scope="module")
def embedded(artifact_root):
    settings = Settings(
        artifacts=artifact_root, host="127.0.0.1", grpc_port=free_port(), grpc_workers=4
    )
    with TestClient(build_app(settings)) as client:
        channel = grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
        yield client, pb_grpc.RecommenderStub(channel)
        channel.close()


@pytest.mark.parametrize(
    "events, message",
    [
        ([], "at least 1"),
        ([{"user_id": -1, "item_id": 1, "type": "click"}], "greater than or equal to 0"),
        ([{"user_id": 1, "item_id": 2**64, "type": "click"}], "less than or equal to"),
        ([{"user_id": 1, "item_id": 1, "type": "like"}], "'impression', 'click' or 'purchase'"),
        (
            [{"user_id": 1, "item_id": 1, "type": "click", "timestamp": time.time() + 86_400}],
            "between 1970 and now",
        ),
        ([{"user_id": 1, "item_id": 1, "type": "click", "timestamp": "yesterday"}], "timestamp"),
        ([{"user_id": 1, "item_id": 1, "type": "click", "extra": 1}], "extra"),
        ([{"user_id": 1, "item_id": 1, "type": "click"}] * 1001, "at most 1000"),
    ],
)
def test_bad_events_are_refused_with_a_message_and_none_is_appended(embedded, events, message):
    http, _ = embedded
    before = http.app.state.online.events.backlog()
    response = http.post("/v1/events", json={"events": events})
    assert response.status_code == 422
    assert message in response.text
    assert http.app.state.online.events.backlog() == before


def test_grpc_send_events_appends_and_refuses_bad_input(embedded):
    http, stub = embedded
    stamp = Timestamp(seconds=1_700_000_000, nanos=500_000_000)
    reply = stub.SendEvents(
        pb.SendEventsRequest(
            events=[
                pb.Event(user_id=2**64 - 1, item_id=7, type="impression", timestamp=stamp),
                pb.Event(user_id=3, item_id=8, type="purchase"),
            ]
        )
    )
    assert reply.accepted == 2
    with pytest.raises(grpc.RpcError) as error:
        stub.SendEvents(pb.SendEventsRequest(events=[pb.Event(user_id=1, item_id=1, type="like")]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events.0.type" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.SendEvents(pb.SendEventsRequest())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    metrics = http.get("/metrics").text
    assert 'recsys_events_appended_total{type="purchase"}' in metrics


def test_embedded_service_learns_a_new_item_from_clicks(embedded, tiny_dataset):
    http, _ = embedded
    assert_new_item_reaches_similar_users(http, tiny_dataset)
    metrics = http.get("/metrics").text
    assert 'recsys_events_processed_total{type="click"}' in metrics
    assert "recsys_index_upserts_total" in metrics and "recsys_online_freshness_seconds" in metrics


def trainer_process(
    artifact_root, redis_url: str, namespace: str, consumer: str
) -> subprocess.Popen:
    env = dict(
        os.environ,
        RECSYS_ARTIFACTS=str(artifact_root),
        RECSYS_REDIS_URL=redis_url,
        RECSYS_REDIS_NAMESPACE=namespace,
        RECSYS_TRAINER_CONSUMER=consumer,
        RECSYS_TRAINER_METRICS_PORT="0",
        RECSYS_EVENTS_STREAM=f"events-{namespace}",
        RECSYS_GRPC_PORT="0",  # no health server: several trainers run at once here
    )
    return subprocess.Popen(
        [str(BIN / "recsys"), "online-train"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_separate_trainer_on_redis_teaches_the_serving_process(
    artifact_root, tiny_dataset, redis_server
):
    namespace = uuid.uuid4().hex[:8]
    settings = Settings(
        artifacts=artifact_root,
        grpc_port=0,
        redis_url=redis_server.url,
        redis_namespace=namespace,
        events_stream=f"events-{namespace}",
        online_trainer="off",
    )
    with TestClient(build_app(settings)) as http:  # opens the namespace and the trainers' group
        trainer = trainer_process(artifact_root, redis_server.url, namespace, "t1")
        try:
            assert_new_item_reaches_similar_users(http, tiny_dataset)
        finally:
            trainer.send_signal(signal.SIGTERM)
            output = trainer.communicate(timeout=30)[0]
    assert trainer.returncode == 0, output
    assert "online trainer t1" in output


def redis_parts(url: str, namespace: str, stream: str):
    client = connect(RedisStoreConfig(url, socket_timeout=5.0))
    log = RedisEventLog(client, stream, f"trainer.{namespace}")
    return client, log, RedisRecentItems(client, namespace, length=1000)


def test_a_killed_trainer_restarts_where_it_left_off_and_loses_no_event(
    artifact_root, bundle, redis_server
):
    namespace = uuid.uuid4().hex[:8]
    stream = f"events-{namespace}"
    client, log, recent = redis_parts(redis_server.url, namespace, stream)
    log.ensure_group()
    users, items = bundle.features.users.ids[:40], bundle.features.items.ids
    rng = np.random.default_rng(0)

    def send(n: int) -> list[tuple[int, int]]:
        pairs = [(int(rng.choice(users)), int(rng.choice(items))) for _ in range(n)]
        for start in range(0, n, 100):
            log.append(
                [Event(user_id=u, item_id=i, type="click") for u, i in pairs[start : start + 100]]
            )
        return pairs

    def drained(timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while log.backlog() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.backlog() == 0

    sent = send(400)
    trainer = trainer_process(artifact_root, redis_server.url, namespace, "t1")
    try:
        drained()
        trainer.send_signal(signal.SIGKILL)  # no goodbye: nothing it held is acked twice or dropped
        trainer.communicate(timeout=10)
        sent += send(600)  # arrives while no trainer runs
        assert log.backlog() == 600
        trainer = trainer_process(artifact_root, redis_server.url, namespace, "t1")
        drained()
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.communicate(timeout=30)
    expected: dict[int, list[int]] = {}
    for user, item in sent:
        expected.setdefault(user, []).append(item)
    got = recent.get_many(np.array(list(expected), np.uint64))
    assert {u: g.tolist() for u, g in zip(expected, got)} == expected  # every click, once, in order
    group = client.xinfo_groups(stream)[0]
    assert group["pending"] == 0 and group["lag"] == 0
    client.close()


class FailingWrites:
    """A store whose writes fail `failures` times: the trainer crashes between read and ack."""

    def __init__(self, store, failures: int):
        self._store, self.failures = store, failures

    def put_many(self, *args):
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("Redis went away mid-batch")
        return self._store.put_many(*args)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_batch_whose_writes_fail_is_not_acked_and_is_trained_on_next_time(
    artifact_root, redis_server
):
    bundle = ModelBundle.load(artifact_root)
    namespace = uuid.uuid4().hex[:8]
    client, log, recent = redis_parts(redis_server.url, namespace, f"events-{namespace}")
    log.ensure_group()
    user = int(bundle.features.users.ids[0])
    store = FailingWrites(in_memory_store(bundle), failures=1)
    before = store.get_many(ITEM_TABLE, [NEW_ITEM]).found[0]
    trainer = OnlineTrainer(
        bundle.two_tower,
        bundle.features,
        bundle.histories,
        store,
        log,
        recent,
        RedisItemUpdateFeed(client, namespace),
        OnlineTrainerConfig(block_seconds=0),
        consumer="t1",
    )
    log.append([Event(user_id=user, item_id=NEW_ITEM, type="click")])
    with pytest.raises(redis.ConnectionError):
        trainer.step()
    assert log.backlog() == 1 and not before
    assert trainer.step() == 1  # the same entry, from the consumer's pending list
    assert log.backlog() == 0
    assert store.get_many(ITEM_TABLE, [NEW_ITEM]).found[0]
    assert recent.get(user)[0].tolist() == [NEW_ITEM]
    client.close()


def test_online_train_refuses_to_start_without_redis(artifact_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    result = subprocess.run(
        [str(BIN / "recsys"), "online-train", "--artifacts", str(artifact_root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "needs RECSYS_REDIS_URL" in result.stderr


def test_a_row_another_process_rewrote_is_read_past_the_local_cache_once_invalidated(
    artifact_root, redis_server
):
    """The trainer writes from its own process; the serving process's cache still holds the
    miss until the index sync invalidates those ids."""
    bundle = ModelBundle.load(artifact_root)
    settings = Settings(
        artifacts=artifact_root,
        redis_url=redis_server.url,
        redis_namespace=uuid.uuid4().hex[:8],
        embedding_cache_ttl_seconds=60,
    )
    writer, reader = open_store(settings, bundle), open_store(settings, bundle)
    assert not reader.get_many(ITEM_TABLE, [NEW_ITEM]).found[0]  # the miss is cached now
    writer.put_many(
        ITEM_TABLE, [NEW_ITEM], np.ones((1, bundle.two_tower.config.id_dim), np.float32)
    )
    reader.invalidate(ITEM_TABLE, [NEW_ITEM])
    assert (
        reader.get_many(ITEM_TABLE, [NEW_ITEM]).vectors[0].tolist()
        == [1.0] * bundle.two_tower.config.id_dim
    )
    writer.close()
    reader.close()


def in_process_trainer(
    bundle: ModelBundle, store, config: OnlineTrainerConfig
) -> tuple[OnlineTrainer, InMemoryEventLog]:
    """A trainer over `store` reading an in-memory log, as the embedded service wires it."""
    log = InMemoryEventLog()
    trainer = OnlineTrainer(
        bundle.two_tower,
        bundle.features,
        bundle.histories,
        store,
        log,
        InMemoryRecentItems(50),
        InMemoryItemUpdateFeed(),
        config,
    )
    return trainer, log


def test_the_trainer_never_writes_back_vectors_it_could_not_read(artifact_root):
    bundle = ModelBundle.load(artifact_root)
    store = DegradedReads(in_memory_store(bundle))
    trainer, log = in_process_trainer(bundle, store, OnlineTrainerConfig(block_seconds=0))
    log.append([Event(user_id=int(bundle.features.users.ids[0]), item_id=NEW_ITEM, type="click")])
    with pytest.raises(ConnectionError):
        trainer.step()
    assert store.writes == 0 and log.backlog() == 1


def burst_drift(artifact_root, anchor: float) -> tuple[float, float]:
    """A burst of clicks on one artifact item by users drawn at random (most of whom never
    touched anything like it): how far its row moved from the artifact's value, and that
    value's norm."""
    bundle = ModelBundle.load(artifact_root)
    store = in_memory_store(bundle)
    trainer, log = in_process_trainer(
        bundle, store, OnlineTrainerConfig(block_seconds=0, batch_events=64, anchor=anchor)
    )
    item = int(bundle.features.items.ids[np.argmax(bundle.features.item_counts[1:])])
    before = store.get_many(ITEM_TABLE, [item]).vectors[0]
    rng = np.random.default_rng(3)
    for _ in range(30):
        users = rng.choice(bundle.features.users.ids, 64)
        log.append([Event(user_id=int(u), item_id=item, type="click") for u in users])
        while trainer.step():
            pass
    after = store.get_many(ITEM_TABLE, [item]).vectors[0]
    return float(np.linalg.norm(after - before)), float(np.linalg.norm(before))


def test_the_anchor_keeps_a_row_near_the_artifact_through_a_burst_of_adversarial_clicks(
    artifact_root,
):
    config = OnlineTrainerConfig()
    anchored, norm = burst_drift(artifact_root, anchor=config.anchor)
    free, _ = burst_drift(artifact_root, anchor=0.0)
    dim = ModelBundle.load(artifact_root).two_tower.config.id_dim
    bound = (1 - config.anchor) / config.anchor * config.learning_rate * dim**0.5
    assert anchored <= bound
    assert anchored < 0.5 * free
