"""Experiments: sticky, balanced assignment by salted hash; each arm's answers from its
artifact version and with its defaults, on both transports; clicks counted to the arm
that served the user; a gateway refusing arms it cannot serve."""

import shutil
from collections import Counter

import grpc
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service.api import gateway
from service.api.embedded import build_app
from service.bundle import ModelBundle
from service.pipeline.experiments import Assignment
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.schemas import Experiment
from service.settings import Settings
from service.testing.redis_servers import free_port
from service.training.artifact import train_and_save
from tests.conftest import tiny_train_config


def experiment(*arms, salt: str = "s1") -> Experiment:
    return Experiment.model_validate({"name": "exp1", "salt": salt, "arms": list(arms)})


def test_assignment_is_sticky_and_splits_by_weight():
    users = range(1, 20_001)
    halves = Assignment(experiment({"name": "a"}, {"name": "b"}))
    counts = Counter(halves.arm_of(u).name for u in users)
    assert abs(counts["a"] / 20_000 - 0.5) < 0.015
    again = Assignment(experiment({"name": "a"}, {"name": "b"}))
    assert all(halves.arm_of(u) == again.arm_of(u) for u in range(1, 2000))
    quarter = Assignment(experiment({"name": "a", "weight": 1}, {"name": "b", "weight": 3}))
    assert abs(Counter(quarter.arm_of(u).name for u in users)["a"] / 20_000 - 0.25) < 0.015
    resalted = Assignment(experiment({"name": "a"}, {"name": "b"}, salt="s2"))
    same = sum(halves.arm_of(u).name == resalted.arm_of(u).name for u in users) / 20_000
    assert 0.47 < same < 0.53  # a new salt reshuffles: independent of the old split
    with pytest.raises(ValueError, match="distinct"):
        experiment({"name": "a"}, {"name": "a"})


@pytest.fixture(scope="module")
def two_versions(artifact_root, tiny_dataset, tmp_path_factory):
    """The tiny artifact's version and a newer one trained beside it."""
    root = tmp_path_factory.mktemp("two_versions")
    older = ModelBundle.load(artifact_root).folder
    shutil.copytree(older, root / older.name)
    train_and_save(tiny_dataset, str(root), tiny_train_config())
    newer = ModelBundle.load(root).folder
    assert newer.name != older.name
    return root, older.name, newer.name


def events_counted(arm: str, kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "recsys_experiment_events_total", {"experiment": "exp1", "arm": arm, "type": kind}
    )
    return value or 0.0


def test_each_arm_answers_from_its_version_with_its_defaults(two_versions, tiny_dataset, tmp_path):
    root, older, newer = two_versions
    arms = (
        {"name": "control"},
        {
            "name": "treatment",
            "version": older,
            "request": {"rules": {"max_per": {"attribute": "category", "count": 1}}},
        },
        {"name": "compressed", "ranker_variant": "output_features"},
    )
    settings = Settings(
        artifacts=root,
        host="127.0.0.1",
        grpc_port=free_port(),
        experiment=experiment(*arms),
        served_log="parquet",
        served_log_dir=tmp_path,
    )
    assignment = Assignment(settings.experiment)
    users = [int(u) for u in ModelBundle.load(root).features.users.ids[:40]]
    by_arm = {u: assignment.arm_of(u).name for u in users}
    assert set(by_arm.values()) == {"control", "treatment", "compressed"}
    category = dict(zip(tiny_dataset.items["item_id"].tolist(), tiny_dataset.items["category"]))
    clicks_before = {arm: events_counted(arm, "click") for arm in set(by_arm.values())}
    with (
        TestClient(build_app(settings)) as http,
        grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel,
    ):
        stub = pb_grpc.RecommenderStub(channel)
        for user in users:
            answer = http.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
            assert answer["experiment"] == "exp1" and answer["arm"] == by_arm[user]
            expected = older if by_arm[user] == "treatment" else newer
            assert answer["model_version"] == expected
            if by_arm[user] == "treatment":  # the arm's rule: one item per category
                assert len({category[i["item_id"]] for i in answer["items"]}) == 5
                assert "max_per" in answer["rules"]
            compressed = by_arm[user] == "compressed"
            assert (answer["ranker"]["variant"] == "output_features") == compressed
            over_grpc = stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=10)
            assert (over_grpc.experiment, over_grpc.arm) == ("exp1", by_arm[user])
            assert [i.item_id for i in over_grpc.items] == [i["item_id"] for i in answer["items"]]
        clicks = [{"user_id": u, "item_id": 1, "type": "click"} for u in users]
        assert http.post("/v1/events", json={"events": clicks}).status_code == 202
        metrics = http.get("/metrics").text
    for arm in ("control", "treatment", "compressed"):
        served = sum(1 for a in by_arm.values() if a == arm)
        assert events_counted(arm, "click") - clicks_before[arm] == served
        assert f'recsys_experiment_requests_total{{arm="{arm}"' in metrics
    assert f'recsys_artifact_memory_bytes{{version="{older}"}}' in metrics
    logged = [r for f in tmp_path.glob("served-*.parquet") for r in pq.read_table(f).to_pylist()]
    assert len(logged) == 2 * len(users)  # each user asked over HTTP and over gRPC
    assert all(r["experiment"] == "exp1" for r in logged)
    assert Counter(r["arm"] for r in logged) == Counter(2 * list(by_arm.values()))


def test_a_gateway_refuses_arms_that_name_versions():
    settings = Settings(
        retrieval_address="127.0.0.1:1",
        ranking_address="127.0.0.1:2",
        redis_url="redis://127.0.0.1:1",
        experiment=experiment({"name": "a"}, {"name": "b", "version": "v2"}),
    )
    with pytest.raises(ValueError, match="cannot name artifact versions or ranker variants"):
        gateway.build_app(settings)
