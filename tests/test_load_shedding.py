"""Load shedding and size limits: past its in-flight limit a process refuses at once (HTTP
429 with Retry-After, gRPC RESOURCE_EXHAUSTED) while the admitted requests are still
running, instead of queueing them past their deadlines; oversize bodies and messages are
refused without being buffered."""

import asyncio
import threading

import grpc
import httpx2
import pytest
from fastapi.testclient import TestClient

from service.api.grpc_server import MAX_MESSAGE_BYTES, GrpcServer
from service.api.http import create_app
from service.metrics import SHED
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.schemas import RecommendResponse

LIMIT = 2


class BlockedPipeline:
    """Answers only once released, and says how many requests are inside it."""

    model_version = "test"

    def __init__(self):
        self.release = threading.Event()
        self.inside = threading.Semaphore(0)

    def recommend(self, request, deadline=None) -> RecommendResponse:
        self.inside.release()
        assert self.release.wait(10)
        return RecommendResponse(
            user_id=request.user_id,
            items=[],
            degraded=False,
            model_version=self.model_version,
            ranker=None,
        )


def test_http_refuses_past_the_limit_at_once_while_admitted_requests_run():
    app = create_app(max_in_flight=LIMIT)
    app.state.pipeline = pipeline = BlockedPipeline()
    shed_before = SHED.labels("http")._value.get()

    async def scenario():
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://recsys") as client:
            admitted = [
                asyncio.create_task(client.post("/v1/recommend", json={"user_id": i}))
                for i in range(LIMIT)
            ]
            for _ in range(LIMIT):  # both admitted requests are inside the pipeline, blocked
                await asyncio.to_thread(pipeline.inside.acquire)
            refused = await asyncio.gather(
                *(client.post("/v1/recommend", json={"user_id": 9}) for _ in range(4))
            )
            healthy = await client.get("/healthz")  # not limited
            pipeline.release.set()
            return await asyncio.gather(*admitted), refused, healthy

    admitted, refused, healthy = asyncio.run(scenario())
    assert [r.status_code for r in admitted] == [200] * LIMIT
    for response in refused:
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert f"over {LIMIT} requests in flight" in response.json()["detail"]
    assert healthy.status_code == 200
    assert SHED.labels("http")._value.get() == shed_before + 4


class BlockedRanking(pb_grpc.RankingServicer):
    service = "Ranking"

    def __init__(self):
        self.release = threading.Event()
        self.inside = threading.Semaphore(0)

    def Rank(self, request, context):
        self.inside.release()
        self.release.wait(10)
        return pb.RankResponse(scores=[0.5] * len(request.item_ids), model_version="test")


def test_grpc_refuses_past_the_limit_with_resource_exhausted():
    servicer = BlockedRanking()
    server = GrpcServer([servicer], "127.0.0.1:0", workers=8, max_in_flight=LIMIT)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            rank = pb_grpc.RankingStub(channel).Rank
            request = pb.RankRequest(user_id=1, item_ids=[1, 2], retrieval_scores=[0.1, 0.2])
            admitted = [rank.future(request, timeout=10) for _ in range(LIMIT)]
            for _ in range(LIMIT):
                assert servicer.inside.acquire(timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                rank(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            servicer.release.set()
            assert [len(f.result().scores) for f in admitted] == [2] * LIMIT
            assert len(rank(request, timeout=10).scores) == 2  # admitted again once below the limit
    finally:
        server.stop(0)


def test_http_bodies_over_the_limit_get_413_whether_declared_or_streamed():
    app = create_app(max_body_bytes=2048)
    app.state.pipeline = pipeline = BlockedPipeline()
    pipeline.release.set()
    big = b'{"user_id": 1, "exclude_item_ids": [' + b"1," * 2000 + b"1]}"
    with TestClient(app) as client:
        declared = client.post(
            "/v1/recommend", content=big, headers={"content-type": "application/json"}
        )
        streamed = client.post(
            "/v1/recommend",
            content=iter([big[:1500], big[1500:3000], big[3000:]]),
            headers={"content-type": "application/json"},
        )
        small = client.post("/v1/recommend", json={"user_id": 1})
    for response in (declared, streamed):
        assert response.status_code == 413 and "over 2048 bytes" in response.json()["detail"]
    assert "content-length" not in {
        k.lower() for k in streamed.request.headers
    }  # really sent chunked
    assert small.status_code == 200


def test_grpc_messages_over_the_limit_are_refused():
    server = GrpcServer([BlockedRanking()], "127.0.0.1:0", workers=2)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            oversize = pb.RankRequest(
                user_id=1, item_ids=list(range(200_000)), retrieval_scores=[0.5] * 200_000
            )
            assert oversize.ByteSize() > MAX_MESSAGE_BYTES
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.RankingStub(channel).Rank(oversize, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(0)


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05abc", b"\x08"])
def test_grpc_bytes_that_are_no_request_get_invalid_argument(payload):
    server = GrpcServer([BlockedRanking()], "127.0.0.1:0", workers=2)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            raw = channel.unary_unary(
                "/recsys.v1.Ranking/Rank", request_serializer=bytes, response_deserializer=bytes
            )
            with pytest.raises(grpc.RpcError) as refused:
                raw(payload, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed /recsys.v1.Ranking/Rank request" in refused.value.details()
    finally:
        server.stop(0)
