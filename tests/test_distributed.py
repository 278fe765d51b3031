"""The distributed topology as separate processes on loopback: Redis, the retrieval and
ranking tiers, the online trainer and the gateway, driven over HTTP and gRPC."""

import os
import signal
import subprocess
import time
import uuid
from collections import Counter

import grpc
import httpx2
import numpy as np
import pytest

from service.api.codec import candidates_from_columns, candidates_to_columns
from service.api.grpc_server import GrpcServer
from service.api.remote import BREAKER_FAILURES, CALL_ATTEMPTS, Tier
from service.pipeline.in_process import RecommendPipeline
from service.pipeline.interface import StageFailed
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.candidates import Candidates
from service.schemas import RankRequest, RecommendRequest
from service.testing.redis_servers import free_port
from service.testing.stack import wait_serving
from tests.test_end_to_end import BIN, wait_ready
from tests.test_online import assert_new_item_reaches_similar_users

ADMIN_TOKEN = "distributed-admin-token"


def stop(process: subprocess.Popen, signum=signal.SIGTERM) -> str:
    if process.poll() is None:
        process.send_signal(signum)
    return process.communicate(timeout=30)[0]


@pytest.fixture(scope="module")
def stack(artifact_root, redis_server):
    namespace = uuid.uuid4().hex[:8]
    env = dict(
        os.environ,
        RECSYS_ARTIFACTS=str(artifact_root),
        RECSYS_REDIS_URL=redis_server.url,
        RECSYS_REDIS_NAMESPACE=namespace,
        RECSYS_EVENTS_STREAM=f"events-{namespace}",
        RECSYS_CATALOG_STREAM=f"catalog-{namespace}",
        RECSYS_HOST="127.0.0.1",
        RECSYS_TRAINER_METRICS_PORT="0",
        RECSYS_TRAINER_CONSUMER="t1",
        RECSYS_INDEX_POLL_SECONDS="0",
        RECSYS_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    ports = {
        tier: (free_port(), free_port())
        for tier in ("retrieval", "ranking", "online-train", "gateway")
    }
    processes = {}

    def start(tier: str, **extra) -> subprocess.Popen:
        tier_env = {**env, **extra}
        if tier in ports:
            tier_env.update(
                RECSYS_HTTP_PORT=str(ports[tier][0]), RECSYS_GRPC_PORT=str(ports[tier][1])
            )
        processes[tier] = subprocess.Popen(
            [str(BIN / "recsys"), "serve", tier],
            env=tier_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return processes[tier]

    try:
        for tier in ("retrieval", "ranking"):
            start(tier)
        for tier in ("retrieval", "ranking"):
            wait_serving(f"127.0.0.1:{ports[tier][1]}", processes[tier])
        wait_serving(
            f"127.0.0.1:{ports['online-train'][1]}", start("online-train")
        )  # in its event group
        gateway = start(
            "gateway",
            RECSYS_RETRIEVAL_ADDRESS=f"127.0.0.1:{ports['retrieval'][1]}",
            RECSYS_RANKING_ADDRESS=f"127.0.0.1:{ports['ranking'][1]}",
        )
        wait_ready(f"http://127.0.0.1:{ports['gateway'][0]}/readyz", gateway)
        with httpx2.Client(base_url=f"http://127.0.0.1:{ports['gateway'][0]}", timeout=10) as http:
            yield http, ports, processes
    finally:
        for process in processes.values():
            stop(process, signal.SIGKILL)


def test_gateway_answers_through_the_tiers_over_http_and_grpc(
    stack, bundle, known_user, served_variant
):
    http, ports, _ = stack
    body = http.post(
        "/v1/recommend", json={"user_id": known_user, "k": 8, "context": {"hour": 9}}
    ).json()
    assert body["degraded"] is False and body["model_version"] == bundle.version
    assert body["ranker"] == {"model": "deepfm", "variant": served_variant}
    assert len({i["item_id"] for i in body["items"]}) == 8
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(
        0 < s < 1 for s in scores
    )  # ranker probabilities
    with grpc.insecure_channel(f"127.0.0.1:{ports['gateway'][1]}") as channel:
        answer = pb_grpc.RecommenderStub(channel).Recommend(
            pb.RecommendRequest(user_id=known_user, k=8, context=pb.Context(hour=9)), timeout=5
        )
    assert [(i.item_id, i.score) for i in answer.items] == [
        (i["item_id"], i["score"]) for i in body["items"]
    ]
    assert answer.ranker.variant == served_variant and not answer.degraded
    refused = http.post("/v1/recommend", json={"user_id": known_user, "k": 0})
    assert refused.status_code == 422
    for tier in ("retrieval", "ranking"):
        metrics = httpx2.get(f"http://127.0.0.1:{ports[tier][0]}/metrics").text
        endpoint = "Retrieve" if tier == "retrieval" else "Rank"
        assert (
            f'recsys_requests_total{{code="OK",endpoint="{endpoint}",transport="grpc"}}' in metrics
        )


def test_the_gateway_applies_rules_with_the_vectors_the_retrieval_tier_sends(
    stack, bundle, known_user, tiny_dataset
):
    """The gateway answers as the in-process pipeline does under the same rules:
    diversity needs the candidates' item vectors, which cross the wire with them."""
    http, _, _ = stack
    asked = {
        "user_id": known_user,
        "k": 8,
        "rules": {"diversity": 0.8, "max_per": {"attribute": "category", "count": 2}},
    }
    body = http.post("/v1/recommend", json=asked).json()
    in_process = RecommendPipeline(bundle).recommend(RecommendRequest.model_validate(asked))
    assert [i["item_id"] for i in body["items"]] == [i.item_id for i in in_process.items]
    assert body["rules"] == in_process.rules and "diversity" in body["rules"]
    category = dict(zip(tiny_dataset.items["item_id"].tolist(), tiny_dataset.items["category"]))
    assert max(Counter(category[i["item_id"]] for i in body["items"]).values()) <= 2


def test_the_gateway_forwards_a_visitors_session_to_the_retrieval_tier(stack, bundle, known_user):
    http, _, _ = stack
    session = bundle.histories.get(known_user)[-10:].tolist()
    asked = {"user_id": 2**64 - 2, "k": 10, "recent_item_ids": session}
    candidates = http.post("/v1/candidates", json=asked).json()["candidates"]
    assert {c["source"] for c in candidates} == {"two_tower"}  # not the cold user's popular
    answered = {i["item_id"] for i in http.post("/v1/recommend", json=asked).json()["items"]}
    assert len(answered) == 10 and not answered & set(session)


def test_the_gateway_forwards_a_filter_and_refuses_a_bad_one_itself(
    stack, tiny_dataset, known_user
):
    http, _, _ = stack
    category = dict(zip(tiny_dataset.items["item_id"].tolist(), tiny_dataset.items["category"]))
    asked = {"user_id": known_user, "k": 6, "filter": {"category": {"in": ["c2"]}}}
    items = http.post("/v1/recommend", json=asked).json()["items"]
    assert len(items) == 6 and {category[i["item_id"]] for i in items} == {"c2"}
    # Refused at the gateway, before any call: many of them leave the tier's breaker shut.
    for _ in range(8):
        refused = http.post("/v1/recommend", json={"user_id": 1, "filter": {"x": {"in": ["y"]}}})
        assert refused.status_code == 422 and "'x'" in refused.json()["detail"]
    again = http.post("/v1/recommend", json=asked).json()
    assert again["degraded"] is False and again["items"] == items


def test_the_gateway_answers_similar_items_from_the_retrieval_tier(stack, bundle):
    http, ports, _ = stack
    item = int(bundle.features.items.ids[0])
    body = http.post("/v1/similar-items", json={"item_id": item, "k": 6}).json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(set(ids)) == 6 and item not in ids and body["degraded"] is False
    assert body["model_version"] == bundle.version
    with grpc.insecure_channel(f"127.0.0.1:{ports['gateway'][1]}") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        answer = stub.SimilarItems(pb.SimilarItemsRequest(item_id=item, k=6), timeout=5)
        assert [i.item_id for i in answer.items] == ids
        with pytest.raises(grpc.RpcError) as refused:
            stub.SimilarItems(pb.SimilarItemsRequest(item_id=2**64 - 3), timeout=5)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    # The tier's NOT_FOUND is an answer, not a failure: many of them leave its breaker shut.
    for _ in range(8):
        assert http.post("/v1/similar-items", json={"item_id": 2**64 - 3}).status_code == 404
    again = http.post("/v1/similar-items", json={"item_id": item, "k": 6}).json()
    assert again["degraded"] is False and [i["item_id"] for i in again["items"]] == ids


def test_the_retrieval_tier_serves_admin_and_the_others_do_not(stack, bundle):
    _, ports, _ = stack
    bearer = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    with grpc.insecure_channel(f"127.0.0.1:{ports['retrieval'][1]}") as channel:
        answer = pb_grpc.AdminStub(channel).ReloadIndex(
            pb.ReloadIndexRequest(), metadata=bearer, timeout=10
        )
    assert not answer.swapped and answer.index_version == bundle.index_version
    for tier in ("ranking", "gateway"):  # no index there
        with (
            grpc.insecure_channel(f"127.0.0.1:{ports[tier][1]}") as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            pb_grpc.AdminStub(channel).ReloadIndex(
                pb.ReloadIndexRequest(), metadata=bearer, timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, tier


def test_an_http_client_deadline_reaches_the_tiers(stack, known_user):
    http, _, _ = stack
    body = {"user_id": known_user, "k": 5}
    assert (
        http.post("/v1/recommend", json=body, headers={"X-Deadline-Ms": "2000"}).json()["degraded"]
        is False
    )
    # Far less than a gRPC round trip: retrieval cannot answer in time, so its fallback does.
    late = http.post("/v1/candidates", json=body, headers={"X-Deadline-Ms": "0.001"}).json()
    assert late["degraded"] is True and {c["source"] for c in late["candidates"]} == {"popular"}
    for bad in ("soon", "0", "-5", "60001"):
        refused = http.post("/v1/recommend", json=body, headers={"X-Deadline-Ms": bad})
        assert refused.status_code == 422 and "X-Deadline-Ms" in refused.text, bad


def test_events_through_the_gateway_change_later_recommendations(stack, tiny_dataset):
    http, _, _ = stack
    assert_new_item_reaches_similar_users(http, tiny_dataset)


def test_a_tier_that_goes_away_is_replaced_by_its_fallback(stack, bundle, known_user, tiny_dataset):
    http, ports, processes = stack
    # Hidden first, through the retrieval tier: its answers and the gateway's fallback
    # (which follows the catalog feed) both leave the item out.
    most_popular = int(bundle.popular.items[0])
    with grpc.insecure_channel(f"127.0.0.1:{ports['retrieval'][1]}") as channel:
        pb_grpc.AdminStub(channel).HideItems(
            pb.ItemIdsRequest(item_ids=[most_popular]),
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
            timeout=5,
        )
    cold = {"user_id": 2**64 - 2, "k": 5, "candidates": 5}
    started = time.monotonic()
    while most_popular in [
        c["item_id"] for c in http.post("/v1/candidates", json=cold).json()["candidates"]
    ]:
        assert time.monotonic() - started < 2.0
        time.sleep(0.05)
    ranked = http.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
    output = stop(processes["ranking"])  # SIGTERM: drains, then exits
    assert processes["ranking"].returncode == 0, output
    unranked = http.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
    assert unranked["degraded"] is True and unranked["ranker"] is None
    retrieval = http.post(
        "/v1/candidates", json={"user_id": known_user, "k": 5, "candidates": 5}
    ).json()
    assert [i["item_id"] for i in unranked["items"]] == [
        c["item_id"] for c in retrieval["candidates"]
    ]  # retrieval order
    assert ranked["items"] != unranked["items"]

    stop(processes["retrieval"], signal.SIGKILL)
    started = time.monotonic()
    popular = http.post("/v1/candidates", json={"user_id": known_user, "k": 5}).json()
    assert time.monotonic() - started < 1.0  # within the default deadline, not a hang
    assert popular["degraded"] is True and {c["source"] for c in popular["candidates"]} == {
        "popular"
    }
    answer = http.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
    assert answer["degraded"] is True and len(answer["items"]) == 5
    # The fallback keeps to a request's filter: the gateway compiles it from the catalog.
    filtered = {
        "user_id": known_user,
        "k": 5,
        "candidates": 5,
        "filter": {"category": {"in": ["c5"]}},
    }
    fallback = http.post("/v1/candidates", json=filtered).json()["candidates"]
    category = dict(zip(tiny_dataset.items["item_id"].tolist(), tiny_dataset.items["category"]))
    assert len(fallback) == 5 and {category[c["item_id"]] for c in fallback} == {"c5"}
    unfiltered = http.post("/v1/candidates", json=cold).json()
    assert unfiltered["degraded"] is True and len(unfiltered["candidates"]) == 5
    assert most_popular not in [c["item_id"] for c in unfiltered["candidates"]]
    assert [c["item_id"] for c in fallback] != [c["item_id"] for c in popular["candidates"]]
    metrics = http.get("/metrics").text
    assert 'recsys_degraded_responses_total{reason="ranking"}' in metrics
    assert 'recsys_degraded_responses_total{reason="retrieval"}' in metrics


class SlowRanking(pb_grpc.RankingServicer):
    service = "Ranking"

    def __init__(self):
        self.calls = 0

    def Rank(self, request, context):
        self.calls += 1
        time.sleep(0.3)
        return pb.RankResponse()


def test_a_slow_tier_fails_at_its_deadline_and_then_opens_its_breaker():
    servicer = SlowRanking()
    server = GrpcServer([servicer], "127.0.0.1:0", workers=8)
    server.start()
    tier = Tier("ranking", f"127.0.0.1:{server.port}")
    rank = pb_grpc.RankingStub(tier.channel).Rank
    try:
        for _ in range(BREAKER_FAILURES):
            started = time.monotonic()
            with pytest.raises(StageFailed, match="DEADLINE_EXCEEDED"):
                tier.read(rank, pb.RankRequest(user_id=1), time.monotonic() + 0.05)
            assert (
                time.monotonic() - started < 0.25
            )  # gave up at the deadline, not after the slow answer
        assert tier.breaker.state == "open"  # the failure that reached the limit opened it
        calls = servicer.calls
        with pytest.raises(StageFailed, match="breaker open"):
            tier.read(rank, pb.RankRequest(user_id=1), time.monotonic() + 0.05)
        assert servicer.calls == calls  # an open breaker fails without calling
        fresh = Tier("ranking", f"127.0.0.1:{server.port}")
        with pytest.raises(StageFailed, match="no time left"):
            fresh.read(
                pb_grpc.RankingStub(fresh.channel).Rank, pb.RankRequest(user_id=1), time.monotonic()
            )
        fresh.close()
    finally:
        tier.close()
        server.stop(0)


def test_rank_requests_are_validated_like_every_other():
    assert "2 retrieval scores for 1 items" in str(
        pytest.raises(
            ValueError, RankRequest, user_id=1, item_ids=[5], retrieval_scores=[0.1, 0.2]
        ).value
    )
    with pytest.raises(ValueError, match="finite"):
        RankRequest(user_id=1, item_ids=[5], retrieval_scores=[float("nan")])


def test_retrieval_columns_carry_every_candidate_field_across_the_wire():
    found = Candidates(
        np.array([5, 2**64 - 1, 9, 4], np.uint64),
        np.array([0.9, 0.5, -0.25, 0.1], np.float32),
        np.array(["knn_embed", "two_tower", "knn_embed", "popular"], dtype=object),
        degraded=True,
        components=np.array([3, None, 0, None], dtype=object),
    )
    wire = pb.RetrieveResponse.FromString(candidates_to_columns(found, "v7").SerializeToString())
    back = candidates_from_columns(wire)
    assert back.item_ids.dtype == np.uint64 and back.item_ids.tolist() == found.item_ids.tolist()
    assert back.scores.tolist() == found.scores.tolist()
    assert back.sources.tolist() == found.sources.tolist() and back.components.tolist() == [
        3,
        None,
        0,
        None,
    ]
    assert back.degraded and wire.model_version == "v7"
    assert len(candidates_from_columns(candidates_to_columns(Candidates.empty(), "v7"))) == 0
    with pytest.raises(StageFailed, match="columns"):
        candidates_from_columns(
            pb.RetrieveResponse(
                item_ids=[1, 2],
                scores=[0.5],
                sources=[0, 0],
                source_names=["two_tower"],
                components=[-1, -1],
            )
        )
    with pytest.raises(StageFailed, match="unnamed source"):
        candidates_from_columns(
            pb.RetrieveResponse(
                item_ids=[1], scores=[0.5], sources=[1], source_names=["two_tower"], components=[-1]
            )
        )


class NamedRanking(pb_grpc.RankingServicer):
    service = "Ranking"

    def __init__(self, name: float):
        self.name = name

    def Rank(self, request, context):
        return pb.RankResponse(scores=[self.name])


def test_a_tier_target_with_several_replicas_balances_over_the_running_ones():
    servers = [GrpcServer([NamedRanking(n)], "127.0.0.1:0") for n in (1.0, 2.0)]
    for server in servers:
        server.start()
        server.set_serving(True)
    tier = Tier("ranking", "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers))
    rank = pb_grpc.RankingStub(tier.channel).Rank

    def answered_by(calls: int) -> list[float]:
        return [
            tier.read(rank, pb.RankRequest(user_id=1), time.monotonic() + 2).scores[0]
            for _ in range(calls)
        ]

    try:
        deadline = time.monotonic() + 5
        while set(answered_by(8)) != {1.0, 2.0}:  # round robin once both connections are up
            assert time.monotonic() < deadline, "calls never reached both replicas"
        servers[0].stop(grace=1)  # GOAWAY: new calls go to the other replica, none fails
        assert set(answered_by(32)) == {2.0}
        servers[1].stop(grace=0)
        with pytest.raises(
            StageFailed, match="UNAVAILABLE"
        ):  # none left: fails at once, to the fallback
            tier.read(rank, pb.RankRequest(user_id=1), time.monotonic() + 2)
    finally:
        tier.close()
        for server in servers:
            server.stop(0)


class RefusesFirst(pb_grpc.RankingServicer):
    """Refuses its first `refusals` calls unrun, as a stopping server does, then answers."""

    service = "Ranking"

    def __init__(self, refusals: int):
        self.refusals, self.calls = refusals, 0

    def Rank(self, request, context):
        self.calls += 1
        if self.calls <= self.refusals:
            context.abort(
                grpc.StatusCode.UNAVAILABLE if self.calls % 2 else grpc.StatusCode.CANCELLED,
                "stopping",
            )
        return pb.RankResponse(scores=[1.0])


@pytest.mark.parametrize("refusals, answered", [(2, True), (3, False)])
def test_calls_refused_unrun_are_tried_again_up_to_the_attempt_limit(refusals, answered):
    servicer = RefusesFirst(refusals)
    server = GrpcServer([servicer], "127.0.0.1:0")
    server.start()
    tier = Tier("ranking", f"127.0.0.1:{server.port}")
    try:

        def read():
            rank = pb_grpc.RankingStub(tier.channel).Rank
            return tier.read(rank, pb.RankRequest(user_id=1), time.monotonic() + 2)

        if answered:
            assert read().scores == [1.0]
        else:
            with pytest.raises(StageFailed, match="UNAVAILABLE"):
                read()
        assert servicer.calls == min(refusals + 1, CALL_ATTEMPTS)
    finally:
        tier.close()
        server.stop(0)
