"""Redis with a password and over TLS: the service works through them, refuses to start with
a wrong password or a server it cannot verify, and the password shows in no log line, metric
or settings repr."""

import logging

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.embedded import build_app
from service.settings import Settings
from service.testing.redis_servers import RedisServer, TlsFiles

PASSWORD = "correct-horse-battery-staple-7"


@pytest.fixture(scope="module")
def protected_redis():
    server = RedisServer(password=PASSWORD)
    yield server
    server.stop()


def test_the_service_works_through_a_password_and_never_shows_it(
    protected_redis, artifact_root, known_user, caplog
):
    settings = Settings(
        artifacts=artifact_root, redis_url=protected_redis.url, grpc_port=0, index_poll_seconds=0
    )
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)
    with caplog.at_level(logging.DEBUG), TestClient(build_app(settings)) as http:
        answer = http.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
        assert (
            len(answer["items"]) == 5 and answer["degraded"] is False
        )  # vectors read from the protected Redis
        event = {
            "events": [
                {"user_id": known_user, "item_id": answer["items"][0]["item_id"], "type": "click"}
            ]
        }
        assert http.post("/v1/events", json=event).status_code == 202
        metrics = http.get("/metrics").text
    assert PASSWORD not in metrics
    assert PASSWORD not in caplog.text
    assert caplog.records  # the check above read real log output


def test_a_wrong_password_stops_startup_with_an_error_that_does_not_echo_it(
    protected_redis, artifact_root
):
    wrong = "wrong-password-1234567"
    settings = Settings(
        artifacts=artifact_root,
        redis_url=f"redis://:{wrong}@127.0.0.1:{protected_redis.port}/0",
        grpc_port=0,
    )
    with pytest.raises(redis.AuthenticationError) as refused, TestClient(build_app(settings)):
        pass
    assert wrong not in str(refused.value)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    files = TlsFiles.create(tmp_path_factory.mktemp("tls"))
    server = RedisServer(password=PASSWORD, tls=files)
    yield server
    server.stop()


def test_the_service_works_through_tls_and_refuses_what_it_cannot_verify(
    tls_redis, artifact_root, known_user
):
    assert tls_redis.url.startswith("rediss://")
    settings = Settings(
        artifacts=artifact_root, redis_url=tls_redis.url, grpc_port=0, index_poll_seconds=0
    )
    with TestClient(build_app(settings)) as http:
        answer = http.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
        assert len(answer["items"]) == 5 and answer["degraded"] is False  # vectors read over TLS
        event = {
            "events": [
                {"user_id": known_user, "item_id": answer["items"][0]["item_id"], "type": "click"}
            ]
        }
        assert http.post("/v1/events", json=event).status_code == 202
    plain = f"redis://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"  # the TLS port does not speak plain Redis
    untrusted = f"rediss://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"  # the system CAs did not sign the test CA
    for url, reason in ((plain, None), (untrusted, "CERTIFICATE_VERIFY_FAILED")):
        with (
            pytest.raises(redis.ConnectionError, match=reason) as refused,
            TestClient(build_app(Settings(artifacts=artifact_root, redis_url=url, grpc_port=0))),
        ):
            pass
        assert PASSWORD not in str(refused.value)
