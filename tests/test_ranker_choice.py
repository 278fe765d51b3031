"""The ranker serves only where `recsys train`'s validation found it lifts ranked order over
retrieval order (RECSYS_RANKER=auto), or as RECSYS_RANKER says; otherwise answers keep
retrieval order with `ranker` null, in process and through the gateway."""

import json
import shutil
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import codec
from service.api.embedded import build_app
from service.api.grpc_server import GrpcServer
from service.api.remote import RemotePipeline
from service.artifacts import MANIFEST, ranker_serves, resolve_version
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.candidates import Candidates, labels
from service.retrieval.catalog import ItemCatalog
from service.retrieval.popular import PopularItems
from service.schemas import RecommendRequest
from service.settings import Settings


def with_validation(ranker: bool) -> dict:
    figures = {
        "pipeline": {"@10": 0.1},
        "candidate_generation": {"@10": 0.2 if not ranker else 0.05},
    }
    return {"validation": {"users": 10, "hit_rate": figures, "choices": {"ranker": ranker}}}


def test_ranker_serves_follows_the_validation_unless_the_setting_says_otherwise():
    assert ranker_serves({}) is True  # trained without validation: ranked, as before
    assert ranker_serves(with_validation(True)) is True
    assert ranker_serves(with_validation(False)) is False
    assert ranker_serves(with_validation(False), "on") is True
    assert ranker_serves(with_validation(True), "off") is False


@pytest.fixture(scope="module")
def unlifted_root(artifact_root, tmp_path_factory):
    """The test artifact, its manifest saying validation found the ranker below retrieval order."""
    root = tmp_path_factory.mktemp("unlifted")
    version = resolve_version(artifact_root)
    shutil.copytree(version, root / version.name)
    manifest = json.loads((root / version.name / MANIFEST).read_text())
    manifest.update(with_validation(False))
    (root / version.name / MANIFEST).write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("setting, ranked", [("auto", False), ("on", True), ("off", False)])
def test_embedded_answers_keep_retrieval_order_where_the_ranker_does_not_lift(
    unlifted_root, known_user, setting, ranked
):
    settings = Settings(artifacts=unlifted_root, grpc_port=0, index_poll_seconds=0, ranker=setting)
    with TestClient(build_app(settings)) as http:
        body = {"user_id": known_user, "k": 10, "candidates": 50}
        answer = http.post("/v1/recommend", json=body).json()
        candidates = http.post("/v1/candidates", json=body).json()["candidates"]
    assert not answer["degraded"]
    if ranked:
        assert answer["ranker"]["model"] == "deepfm"
    else:
        assert answer["ranker"] is None
        assert [i["item_id"] for i in answer["items"]] == [c["item_id"] for c in candidates[:10]]


class FixedRetrieval(pb_grpc.RetrievalServicer):
    service = "Retrieval"

    def Retrieve(self, request, context):
        ids = np.arange(1, 21, dtype=np.uint64)
        found = Candidates(
            ids, np.linspace(1.0, 0.5, 20, dtype=np.float32), labels("two_tower", 20)
        )
        return codec.candidates_to_columns(found, "v1")


class CountingRanking(pb_grpc.RankingServicer):
    """Scores the candidates in reverse retrieval order, and counts its calls."""

    service = "Ranking"

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def Rank(self, request, context):
        with self.lock:
            self.calls += 1
        return pb.RankResponse(
            scores=np.linspace(0.0, 1.0, len(request.item_ids)).tolist(),
            ranker=pb.RankerInfo(model="deepfm", variant="full"),
        )


@pytest.mark.parametrize("ranks", [True, False])
def test_the_gateway_calls_the_ranking_tier_only_when_the_ranker_serves(ranks):
    ranking = CountingRanking()
    servers = [GrpcServer([FixedRetrieval()], "127.0.0.1:0"), GrpcServer([ranking], "127.0.0.1:0")]
    for server in servers:
        server.start()
    settings = Settings(
        retrieval_address=f"127.0.0.1:{servers[0].port}",
        ranking_address=f"127.0.0.1:{servers[1].port}",
        redis_url="redis://127.0.0.1:1",  # the pipeline itself never opens it
    )
    popular = PopularItems("v1", np.array([99], np.uint64), np.array([0.1], np.float32))
    catalog = ItemCatalog(popular.items, np.zeros((2, 1), np.int64), [])
    pipeline = RemotePipeline(settings, popular, catalog, ranks=ranks)
    try:
        answer = pipeline.recommend(RecommendRequest(user_id=1, k=5), time.monotonic() + 2)
    finally:
        pipeline.close()
        for server in servers:
            server.stop(0)
    items = [i.item_id for i in answer.items]
    assert not answer.degraded and ranking.calls == int(ranks)
    if ranks:
        assert items == [20, 19, 18, 17, 16] and answer.ranker.model == "deepfm"
    else:
        assert items == [1, 2, 3, 4, 5] and answer.ranker is None
