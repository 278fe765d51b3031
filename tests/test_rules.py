"""Business rules and diversity after ranking: each rule on a small list where its effect
is known, their validation, the service's defaults under a request's, and both
transports answering alike."""

from collections import Counter

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.embedded import build_app
from service.pipeline.in_process import PipelineOptions, RecommendPipeline
from service.pipeline.rules import apply_rules
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.catalog import ItemCatalog
from service.schemas import RecommendRequest, Rules
from service.settings import Settings
from service.testing.redis_servers import free_port

# Items 1..6: categories a a b b c c; brand x on 1 and 3.
VALUES = ["cat=a", "cat=b", "cat=c", "brand=x"]


@pytest.fixture
def catalog() -> ItemCatalog:
    rows = np.zeros((7, 2), np.int64)
    rows[1:, 0] = [1, 1, 2, 2, 3, 3]
    rows[[1, 3], 1] = 4
    return ItemCatalog(np.arange(1, 7, dtype=np.uint64), rows, VALUES)


IDS = np.arange(1, 7, dtype=np.uint64)
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32)  # the ranker's, best first


def answer(catalog, rules: dict, k: int = 4, ranked: bool = True, vectors=None, scores=SCORES):
    return apply_rules(IDS, scores, k, Rules.model_validate(rules), catalog, ranked, vectors)


def test_no_rule_keeps_the_rankers_order(catalog):
    got = answer(catalog, {})
    assert got.item_ids.tolist() == [1, 2, 3, 4] and got.applied == []


def test_boost_and_bury_scale_the_scores_of_the_items_holding_a_value(catalog):
    boosted = answer(catalog, {"boost": [{"attribute": "cat", "values": ["c"], "factor": 2.0}]})
    assert boosted.item_ids.tolist() == [5, 1, 2, 6] and boosted.applied == ["boost"]
    # The answer shows the ranker's scores; its order is the rules'.
    assert boosted.scores.tolist() == pytest.approx([0.5, 0.9, 0.8, 0.4])
    buried = answer(catalog, {"bury": [{"attribute": "brand", "values": ["x"], "factor": 0.5}]})
    assert buried.item_ids.tolist() == [2, 4, 5, 1] and buried.applied == ["bury"]
    untouched = answer(catalog, {"boost": [{"attribute": "cat", "values": ["z"], "factor": 3}]})
    assert untouched.applied == []


def test_max_per_caps_each_value_and_says_when_it_had_to_relax(catalog):
    capped = answer(catalog, {"max_per": {"attribute": "cat", "count": 1}}, k=3)
    assert capped.item_ids.tolist() == [1, 3, 5] and capped.applied == ["max_per"]
    short = answer(catalog, {"max_per": {"attribute": "cat", "count": 1}}, k=5)
    assert short.item_ids.tolist() == [1, 3, 5, 2, 4] and short.applied == ["max_per:relaxed"]


def test_diversity_trades_score_for_distance(catalog):
    """Items 1 and 2 point the same way, 3 another way: some diversity picks 3 second."""
    vectors = np.array(
        [[1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.01], [0, 0, 1], [0, 0.01, 1]], np.float32
    )
    plain = answer(catalog, {"diversity": 0.0}, k=3, vectors=vectors)
    assert plain.item_ids.tolist() == [1, 2, 3] and plain.applied == []
    diverse = answer(catalog, {"diversity": 0.5}, k=3, vectors=vectors)
    assert diverse.item_ids.tolist() == [1, 3, 5] and diverse.applied == ["diversity"]
    assert answer(catalog, {"diversity": 0.5}, k=3).applied == []  # no vectors: no diversity


def test_pins_place_items_candidates_or_not_but_never_a_hidden_one(catalog):
    pinned = answer(
        catalog, {"pin": [{"item_id": 6, "position": 1}, {"item_id": 99, "position": 3}]}
    )
    assert pinned.item_ids.tolist() == [6, 1, 99, 2] and pinned.applied == ["pin"]
    assert pinned.scores.tolist() == pytest.approx([0.4, 0.9, 0.0, 0.8])
    beyond = answer(catalog, {"pin": [{"item_id": 5, "position": 50}]})
    assert beyond.item_ids.tolist() == [1, 2, 3, 4, 5][:4]  # past the end: after the others
    catalog.hide(np.array([6], np.uint64))
    assert answer(catalog, {"pin": [{"item_id": 6, "position": 1}]}).item_ids[0] != 6


def test_in_retrieval_order_the_place_is_what_factors_scale(catalog):
    """Without the ranker the candidates come in retrieval order, which is not score order
    (kNN-Embed's shares): no rule keeps that order, and a boost moves up from it."""
    cosines = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7], np.float32)
    kept = answer(
        catalog, {"max_per": {"attribute": "cat", "count": 2}}, ranked=False, scores=cosines
    )
    assert kept.item_ids.tolist() == [1, 2, 3, 4] and kept.scores.tolist() == pytest.approx(
        [0.1, 0.9, 0.2, 0.8]
    )
    boosted = answer(
        catalog,
        {"boost": [{"attribute": "cat", "values": ["c"], "factor": 10}]},
        ranked=False,
        scores=cosines,
    )
    assert boosted.item_ids.tolist()[:2] == [5, 6]


@pytest.mark.parametrize(
    "rules",
    [
        {"boost": [{"attribute": "cat", "values": ["a"], "factor": 0.5}]},
        {"bury": [{"attribute": "cat", "values": ["a"], "factor": 2}]},
        {"pin": [{"item_id": 1, "position": 1}, {"item_id": 2, "position": 1}]},
        {"pin": [{"item_id": 1, "position": 0}]},
        {"diversity": 1.5},
        {"max_per": {"attribute": "cat", "count": 0}},
        {"shuffle": True},
    ],
)
def test_rules_that_make_no_sense_are_refused(rules):
    with pytest.raises(ValidationError):
        RecommendRequest.model_validate({"user_id": 1, "rules": rules})


def test_the_services_defaults_hold_under_a_requests_rules(
    bundle, known_user, tiny_dataset, monkeypatch
):
    category = dict(zip(tiny_dataset.items["item_id"].tolist(), tiny_dataset.items["category"]))
    monkeypatch.setenv("RECSYS_RULES", '{"max_per": {"attribute": "category", "count": 1}}')
    defaults = Settings().rules
    pipeline = RecommendPipeline(bundle, options=PipelineOptions(rules=defaults))
    plain = pipeline.recommend(RecommendRequest(user_id=known_user, k=6))
    assert len({category[i.item_id] for i in plain.items}) == 6 and "max_per" in plain.rules
    first = plain.items[-1].item_id
    pinned = pipeline.recommend(
        RecommendRequest.model_validate(
            {"user_id": known_user, "k": 6, "rules": {"pin": [{"item_id": first, "position": 1}]}}
        )
    )
    assert pinned.items[0].item_id == first and set(pinned.rules) >= {"pin", "max_per"}
    assert len({category[i.item_id] for i in pinned.items}) == 6  # the default still holds


def test_both_transports_apply_the_same_rules(artifact_root, bundle, known_user, tiny_dataset):
    settings = Settings(artifacts=artifact_root, host="127.0.0.1", grpc_port=free_port())
    promoted = int(bundle.popular.items[3])
    asked = {
        "user_id": known_user,
        "k": 8,
        "rules": {
            "boost": [{"attribute": "category", "values": ["c2"], "factor": 1.5}],
            "max_per": {"attribute": "category", "count": 2},
            "diversity": 0.3,
            "pin": [{"item_id": promoted, "position": 2}],
        },
    }
    message = pb.RecommendRequest(
        user_id=known_user,
        k=8,
        rules=pb.Rules(
            boost=[pb.AttributeFactor(attribute="category", values=["c2"], factor=1.5)],
            max_per=pb.MaxPer(attribute="category", count=2),
            diversity=0.3,
            pin=[pb.Pin(item_id=promoted, position=2)],
        ),
    )
    with (
        TestClient(build_app(settings)) as http,
        grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel,
    ):
        over_http = http.post("/v1/recommend", json=asked).json()
        over_grpc = pb_grpc.RecommenderStub(channel).Recommend(message, timeout=10)
        refused = http.post("/v1/recommend", json={"user_id": 1, "rules": {"diversity": 2}})
    assert refused.status_code == 422
    assert [i.item_id for i in over_grpc.items] == [i["item_id"] for i in over_http["items"]]
    assert list(over_grpc.rules) == over_http["rules"]
    assert over_http["items"][1]["item_id"] == promoted and "pin" in over_http["rules"]
    category = dict(zip(tiny_dataset.items["item_id"].tolist(), tiny_dataset.items["category"]))
    unpinned = [i["item_id"] for i in over_http["items"] if i["item_id"] != promoted]
    assert max(Counter(category[i] for i in unpinned).values()) <= 2
