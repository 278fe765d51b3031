"""Load for the gateway over HTTP and gRPC: a Zipf mix of known users plus some cold ones;
after a share of the answers, the frontend's feedback (impressions of what was shown, a
click on one of them). When the run ends, an SLO gate sets the exit code.

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 -t 60s \
        --csv results/load

Both user classes run unless named on the command line (`HttpRecommendUser`,
`GrpcRecommendUser`). Known user ids come from the artifact RECSYS_ARTIFACTS points at;
without it every user is cold (popular-items answers). Settings: `LoadSettings` below,
from RECSYS_LOAD_* variables.
"""

import logging
import random
import time
from urllib.parse import urlparse

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import HttpUser, User, between, events, task
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc

# gRPC's blocking calls must yield to gevent, or one user's call stalls every other user.
grpc_gevent.init_gevent()
log = logging.getLogger("load_tests")


class LoadSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_LOAD_")

    artifacts: str | None = Field(
        None, validation_alias="RECSYS_ARTIFACTS", description="Known users' source."
    )
    cold_share: float = Field(
        0.1, ge=0, le=1, description="Requests for users the service has never seen."
    )
    feedback_share: float = Field(
        0.3, ge=0, le=1, description="Answers followed by impressions and a click."
    )
    zipf_exponent: float = Field(1.2, gt=0, description="Popularity skew over known users.")
    k: int = Field(10, ge=1, le=500)
    grpc_target: str | None = Field(
        None, description="host:port of the gateway's gRPC; default: --host's host, port 50051."
    )
    grpc_timeout_seconds: float = Field(2.0, gt=0)
    # The SLO gate: a run that breaks any budget exits 1.
    max_failure_ratio: float = Field(0.0, ge=0, le=1)
    p95_ms: float = Field(250.0, gt=0)
    p99_ms: float = Field(500.0, gt=0)


SETTINGS = LoadSettings()


def known_users(artifacts: str | None) -> np.ndarray:
    if not artifacts:
        return np.empty(0, dtype=np.uint64)
    from service.artifacts import resolve_version
    from service.data.histories import UserHistories

    return UserHistories.load(resolve_version(artifacts) / "histories.safetensors").user_ids


USERS = known_users(SETTINGS.artifacts)
RANK_WEIGHTS = (
    np.cumsum(1.0 / np.arange(1, len(USERS) + 1) ** SETTINGS.zipf_exponent) if len(USERS) else None
)


def pick_user() -> int:
    if RANK_WEIGHTS is None or random.random() < SETTINGS.cold_share:
        return random.getrandbits(63)
    return int(random.choices(USERS, cum_weights=RANK_WEIGHTS)[0])


def feedback(user_id: int, shown: list[int]) -> list[tuple[int, str]]:
    """(item, type) pairs a frontend sends back: every impression, one click."""
    return [(item, "impression") for item in shown] + [(random.choice(shown), "click")]


class HttpRecommendUser(HttpUser):
    wait_time = between(0.0, 0.05)

    @task
    def recommend(self) -> None:
        body = {"user_id": pick_user(), "k": SETTINGS.k, "context": {"hour": random.randrange(24)}}
        with self.client.post(
            "/v1/recommend", json=body, name="/v1/recommend", catch_response=True
        ) as response:
            if response.status_code != 200 or len(response.json()["items"]) != SETTINGS.k:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            shown = [item["item_id"] for item in response.json()["items"]]
        if random.random() < SETTINGS.feedback_share:
            events_ = [
                {"user_id": body["user_id"], "item_id": i, "type": t}
                for i, t in feedback(body["user_id"], shown)
            ]
            with self.client.post(
                "/v1/events", json={"events": events_}, name="/v1/events", catch_response=True
            ) as response:
                if response.status_code != 202 or response.json()["accepted"] != len(events_):
                    response.failure(f"status {response.status_code}: {response.text[:200]}")


class GrpcRecommendUser(User):
    """The same traffic over recsys.v1.Recommender; each call is reported to locust's stats."""

    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        target = SETTINGS.grpc_target or f"{urlparse(self.host).hostname}:50051"
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.RecommenderStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def call(self, name: str, method, request, check) -> object | None:
        started = time.perf_counter()
        answer, error = None, None
        try:
            answer = method(request, timeout=SETTINGS.grpc_timeout_seconds)
            check(answer)
        except (grpc.RpcError, AssertionError) as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=answer.ByteSize() if answer is not None else 0,
            exception=error,
            context={},
        )
        return None if error else answer

    @task
    def recommend(self) -> None:
        request = pb.RecommendRequest(
            user_id=pick_user(), k=SETTINGS.k, context=pb.Context(hour=random.randrange(24))
        )

        def full_page(answer) -> None:
            assert len(answer.items) == SETTINGS.k, f"{len(answer.items)} items"

        answer = self.call("Recommend", self.stub.Recommend, request, full_page)
        if answer is None or random.random() >= SETTINGS.feedback_share:
            return
        shown = [item.item_id for item in answer.items]
        sent = [
            pb.Event(user_id=request.user_id, item_id=i, type=t)
            for i, t in feedback(request.user_id, shown)
        ]

        def all_accepted(reply) -> None:
            assert reply.accepted == len(sent), f"accepted {reply.accepted} of {len(sent)}"

        self.call(
            "SendEvents", self.stub.SendEvents, pb.SendEventsRequest(events=sent), all_accepted
        )


def slo_breaches(stats, settings: LoadSettings) -> list[str]:
    """What the run broke of its budgets; empty: it kept them all."""
    breaches = []
    if stats.num_requests == 0:
        return ["no requests were made"]
    if stats.fail_ratio > settings.max_failure_ratio:
        breaches.append(f"failure ratio {stats.fail_ratio:.4f} > {settings.max_failure_ratio}")
    for quantile, budget in ((0.95, settings.p95_ms), (0.99, settings.p99_ms)):
        observed = stats.get_response_time_percentile(quantile)
        if observed > budget:
            breaches.append(f"p{round(quantile * 100)} {observed:.0f} ms > {budget:g} ms")
    return breaches


@events.quitting.add_listener
def slo_gate(environment, **_) -> None:
    breaches = slo_breaches(environment.stats.total, SETTINGS)
    for breach in breaches:
        log.error("SLO broken: %s", breach)
    if not breaches:
        log.info("SLO kept: %d requests", environment.stats.total.num_requests)
    environment.process_exit_code = 1 if breaches else 0
