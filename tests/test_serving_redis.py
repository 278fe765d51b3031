"""The service with its embedding table on Redis: same answers as in-process, degraded
(never failing) answers while Redis is away, and recovery by itself when it returns."""

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from service.api.embedded import build_app
from service.embeddings.tables import USER_TABLE
from service.settings import Settings
from service.testing.redis_servers import RedisServer


@pytest.mark.parametrize("backend", ["redis_server", "redis_cluster"])
def test_redis_table_answers_like_the_in_process_one(
    backend, request, artifact_root, pipeline, bundle, known_user
):
    server = request.getfixturevalue(backend)
    settings = Settings(
        artifacts=artifact_root,
        grpc_port=0,
        redis_url=server.url,
        redis_cluster=backend == "redis_cluster",
        redis_namespace=uuid.uuid4().hex[:8],
        ranker_variant="trained",  # as `pipeline` ranks
    )
    from service.schemas import RecommendRequest

    expected = pipeline.recommend(RecommendRequest(user_id=known_user, k=10)).model_dump()
    expected.pop("request_id")  # every answer has its own
    with TestClient(build_app(settings)) as client:
        store = client.app.state.pipeline.store
        assert type(store).__name__ == "RedisEmbeddingStore"
        assert store.size(USER_TABLE) == len(bundle.features.users)  # loaded on first start
        body = client.post("/v1/recommend", json={"user_id": known_user, "k": 10}).json()
    assert body.pop("request_id") and body == expected


def test_degraded_while_redis_is_down_then_recovers(artifact_root, known_user):
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    settings = Settings(
        artifacts=artifact_root,
        grpc_port=0,
        redis_url=server.url,
        redis_namespace="fault",
        embedding_cache_entries=0,
    )
    try:
        with TestClient(build_app(settings)) as client:
            before = client.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
            assert before["degraded"] is False
            server.kill()
            for _ in range(5):
                response = client.post("/v1/recommend", json={"user_id": known_user, "k": 5})
                assert response.status_code == 200
                assert response.json()["degraded"] is True and len(response.json()["items"]) == 5
            assert (
                'recsys_degraded_responses_total{reason="embedding_store"}'
                in client.get("/metrics").text
            )
            refused = client.post(
                "/v1/events", json={"events": [{"user_id": 1, "item_id": 2, "type": "click"}]}
            )
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "no event of the request was appended, retry" in refused.json()["detail"]
            server.start()  # same port; AOF brings the rows back
            deadline = (
                time.monotonic() + 10
            )  # the breakers let a call through after their reset time
            while (
                after := client.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
            )["degraded"]:
                assert time.monotonic() < deadline, "still degraded after Redis came back"
                time.sleep(0.2)
            assert after.pop("request_id") != before.pop("request_id")
            assert after == before
    finally:
        server.stop()
