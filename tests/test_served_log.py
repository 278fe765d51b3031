"""Served-list logging: every answer's request id, events that send it back, the lists
written to Redis (byte layout) and Parquet off the request path, sampling by request id,
and a sink that fails or falls behind never failing an answer."""

import threading
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
from fastapi.testclient import TestClient

from service.api.embedded import build_app
from service.metrics import SERVED_LISTS
from service.pipeline.in_process import RecommendPipeline
from service.pipeline.served_log import (
    InMemoryServedLog,
    ParquetServedLog,
    RedisServedLog,
    ServedList,
    ServedListLogger,
    ServedListSink,
    sampled,
)
from service.schemas import EventsRequest, RecommendRequest
from service.settings import Settings
from service.testing.redis_servers import free_port


def served(request_id: str = "0" * 32, items=(7, 2**64 - 1)) -> ServedList:
    return ServedList(
        request_id=request_id,
        user_id=42,
        item_ids=list(items),
        scores=[0.5, 0.25][: len(items)],
        sources=["two_tower", "popular"][: len(items)],
        model_version="v1",
        rules=["boost"],
        context={"hour": 9},
        timestamp=1700000000.5,
    )


def wait_for(check, seconds: float = 5.0) -> None:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds
        time.sleep(0.01)


def test_every_answer_has_a_request_id_and_its_list_is_logged(bundle, known_user):
    sink = InMemoryServedLog()
    logger = ServedListLogger(sink, flush_seconds=0.05)
    pipeline = RecommendPipeline(bundle, served_log=logger)
    answers = [
        pipeline.recommend(RecommendRequest(user_id=known_user, k=5, context={"hour": 3}))
        for _ in range(3)
    ]
    assert len({a.request_id for a in answers}) == 3
    wait_for(lambda: len(sink.lists) == 3)
    logged = {s.request_id: s for s in sink.lists}
    first = logged[answers[0].request_id]
    assert first.user_id == known_user and first.model_version == bundle.version
    assert first.item_ids == [i.item_id for i in answers[0].items]
    assert first.scores == pytest.approx([i.score for i in answers[0].items])
    assert set(first.sources) <= {"two_tower", "item_to_item", "knn_embed", "popular"}
    assert first.context == {"hour": 3}
    logger.close()


def test_sampling_is_by_request_id_and_keeps_about_the_share_asked():
    ids = [uuid.uuid4().hex for _ in range(4000)]
    kept = sum(sampled(i, 0.25) for i in ids)
    assert 800 < kept < 1200
    assert all(sampled(i, 0.25) == sampled(i, 0.25) for i in ids[:50])
    assert not any(sampled(i, 0.0) for i in ids) and all(sampled(i, 1.0) for i in ids)


def test_the_redis_layout_of_a_served_list(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    stream = f"served-{uuid.uuid4().hex[:8]}"
    RedisServedLog(redis.Redis.from_url(redis_server.url), stream, 1000).write([served()])
    [(_, fields)] = client.xrange(stream)
    assert fields == {
        b"request": b"0" * 32,
        b"user": b"42",
        b"items": (7).to_bytes(8, "little") + b"\xff" * 8,
        b"scores": np.array([0.5, 0.25], "<f4").tobytes(),
        b"sources": b"two_tower,popular",
        b"model": b"v1",
        b"rules": b"boost",
        b"context": b'{"hour": 9}',
        b"ts": b"1700000000.5",
        b"experiment": b"",
        b"arm": b"",
    }
    client.close()


def test_parquet_files_appear_whole_and_hold_every_list(tmp_path):
    logger = ServedListLogger(ParquetServedLog(tmp_path), flush_seconds=0.05)
    for n in range(5):
        logger.record(served(f"{n:032x}"))
    logger.close()
    files = sorted(tmp_path.glob("served-*.parquet"))
    assert files and not list(tmp_path.glob(".*partial"))
    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    assert [r["request_id"] for r in rows] == [f"{n:032x}" for n in range(5)]
    assert rows[0]["item_ids"] == [7, 2**64 - 1] and rows[0]["context"] == '{"hour": 9}'


class StuckSink(ServedListSink):
    def __init__(self):
        self.release = threading.Event()

    def write(self, lists):
        self.release.wait(10)
        raise ConnectionError("sink down")


def test_a_stuck_or_failing_sink_drops_lists_and_never_blocks_an_answer():
    sink = StuckSink()
    logger = ServedListLogger(sink, queue_size=4, flush_seconds=0.01)
    dropped = SERVED_LISTS.labels("dropped")._value.get()
    started = time.monotonic()
    for n in range(50):
        logger.record(served(f"{n:032x}"))
    assert time.monotonic() - started < 1.0  # enqueueing does not wait for the sink
    assert SERVED_LISTS.labels("dropped")._value.get() - dropped >= 40
    sink.release.set()
    logger.close()


def test_events_carry_the_request_id_back_and_bad_ones_are_refused(artifact_root, tmp_path):
    settings = Settings(
        artifacts=artifact_root,
        host="127.0.0.1",
        grpc_port=free_port(),
        served_log="parquet",
        served_log_dir=tmp_path,
    )
    with TestClient(build_app(settings)) as http:
        answer = http.post("/v1/recommend", json={"user_id": 1, "k": 3}).json()
        request_id = answer["request_id"]
        click = {"user_id": 1, "item_id": answer["items"][0]["item_id"], "type": "click"}
        accepted = http.post("/v1/events", json={"events": [{**click, "request_id": request_id}]})
        assert accepted.status_code == 202
        refused = http.post("/v1/events", json={"events": [{**click, "request_id": "nope"}]})
        assert refused.status_code == 422
        similar = http.post("/v1/similar-items", json={"item_id": click["item_id"]}).json()
        assert len(similar["request_id"]) == 32
    rows = [r for f in tmp_path.glob("served-*.parquet") for r in pq.read_table(f).to_pylist()]
    assert [r["request_id"] for r in rows] == [request_id]
    parsed = EventsRequest.model_validate({"events": [{**click, "request_id": request_id}]})
    assert parsed.events[0].request_id == request_id
