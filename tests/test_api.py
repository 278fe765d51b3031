"""HTTP and gRPC against one embedded service (the app's lifespan starts both)."""

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.embedded import build_app
from service.artifact_tables import in_memory_store
from service.pipeline.in_process import RecommendPipeline
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.two_tower import cold_user_vector, item_vectors
from service.schemas import SimilarItemsRequest
from service.settings import Settings
from service.testing.redis_servers import free_port
from service.testing.stores import DegradedReads


@pytest.fixture(scope="module")
def service(artifact_root):
    settings = Settings(
        artifacts=artifact_root, host="127.0.0.1", grpc_port=free_port(), grpc_workers=4
    )
    with TestClient(build_app(settings)) as client:
        channel = grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
        yield client, channel
        channel.close()


@pytest.fixture(scope="module")
def http(service):
    return service[0]


@pytest.fixture(scope="module")
def stub(service):
    return pb_grpc.RecommenderStub(service[1])


def recommend(http, **body):
    response = http.post("/v1/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_recommend_returns_k_distinct_unseen_items_sorted(http, bundle, known_user, served_variant):
    body = recommend(http, user_id=known_user, k=10)
    assert body["user_id"] == known_user and body["degraded"] is False
    assert body["model_version"] == bundle.version
    assert body["ranker"] == {"model": "deepfm", "variant": served_variant}
    ids = [item["item_id"] for item in body["items"]]
    scores = [item["score"] for item in body["items"]]
    assert len(ids) == 10 == len(set(ids))
    assert scores == sorted(scores, reverse=True)
    assert not set(ids) & set(bundle.histories.get(known_user).tolist())


def test_exclusions_context_and_candidates_are_honoured(http, known_user):
    first = recommend(http, user_id=known_user, k=5)
    excluded = [item["item_id"] for item in first["items"][:3]]
    second = recommend(
        http,
        user_id=known_user,
        k=5,
        exclude_item_ids=excluded,
        context={"hour": 20, "weekday": 4},
        candidates=50,
    )
    assert not {item["item_id"] for item in second["items"]} & set(excluded)
    assert len(second["items"]) == 5


def test_context_changes_scores(http, known_user):
    morning = recommend(http, user_id=known_user, k=5, context={"hour": 8})
    evening = recommend(http, user_id=known_user, k=5, context={"hour": 21})
    assert [i["score"] for i in morning["items"]] != [i["score"] for i in evening["items"]]


def test_candidates_endpoint_reports_sources_in_retrieval_order(http, bundle, known_user):
    response = http.post("/v1/candidates", json={"user_id": known_user, "k": 5, "candidates": 40})
    assert response.status_code == 200
    candidates = response.json()["candidates"]
    assert len(candidates) == 40 == len({c["item_id"] for c in candidates})
    assert {c["source"] for c in candidates} == {"two_tower"}
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True)


def test_unknown_user_gets_popular_items(http, bundle):
    body = recommend(http, user_id=2**64 - 1, k=5)
    assert len(body["items"]) == 5
    popular_top = {int(i) for i in bundle.popular.items[:200]}
    assert {item["item_id"] for item in body["items"]} <= popular_top
    candidates = http.post("/v1/candidates", json={"user_id": 2**64 - 1, "k": 5}).json()[
        "candidates"
    ]
    assert {c["source"] for c in candidates} == {"popular"}
    assert [c["item_id"] for c in candidates[:5]] == [int(i) for i in bundle.popular.items[:5]]


def test_a_visitor_with_session_items_is_served_from_them_not_from_popular(
    http, stub, bundle, known_user
):
    """A logged-out visitor: an id the service does not know, and the items of their session.
    Sent a known user's latest items, the answer comes from the vector search, leaves those
    items out, and is closer to that user's own answer than the popular list is."""
    session = bundle.histories.get(known_user)[-20:].tolist()
    visitor = 2**64 - 2
    asked = {"user_id": visitor, "k": 20, "recent_item_ids": session}
    candidates = http.post("/v1/candidates", json=asked).json()["candidates"]
    assert {c["source"] for c in candidates} == {"two_tower"}
    answered = [c["item_id"] for c in candidates]
    assert not set(answered) & set(session)
    own = {
        c["item_id"]
        for c in http.post("/v1/candidates", json={"user_id": known_user, "k": 20}).json()[
            "candidates"
        ]
    }
    popular = set(bundle.popular.top(20, np.array(session, np.uint64)).item_ids.tolist())
    assert len(own & set(answered)) > len(own & popular)
    # The same request over gRPC is answered the same.
    over_http = recommend(http, **asked)
    over_grpc = stub.Recommend(as_request(**asked), timeout=10)
    assert [(i.item_id, i.score) for i in over_grpc.items] == [
        (i["item_id"], i["score"]) for i in over_http["items"]
    ]
    # Session items the catalogue does not hold are left out; with none it knows, the
    # visitor gets popular items.
    unknown_items = {"user_id": visitor, "k": 5, "recent_item_ids": [2**64 - 1, 2**63]}
    sources = {
        c["source"] for c in http.post("/v1/candidates", json=unknown_items).json()["candidates"]
    }
    assert sources == {"popular"}


def test_small_catalog_fills_up_with_popular_items(http, bundle, known_user):
    n = len(bundle.index) - len(bundle.histories.get(known_user))
    candidates = http.post(
        "/v1/candidates", json={"user_id": known_user, "k": 1, "candidates": 2000}
    ).json()["candidates"]
    assert len(candidates) == n  # every unseen item, once


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": 1, "k": 0}, "k"),
        ({"user_id": 1, "k": 501}, "k"),
        ({"user_id": -1}, "user_id"),
        ({"user_id": 2**64}, "user_id"),
        ({"user_id": "42"}, "user_id"),
        ({"user_id": 1.5}, "user_id"),
        ({"k": 3}, "user_id"),
        ({"user_id": 1, "k": 20, "candidates": 10}, "candidates"),
        ({"user_id": 1, "candidates": 2001}, "candidates"),
        ({"user_id": 1, "strategy": "random"}, "strategy"),
        ({"user_id": 1, "context": {"hour": 24}}, "hour"),
        ({"user_id": 1, "exclude_item_ids": list(range(1001))}, "exclude_item_ids"),
        ({"user_id": 1, "recent_item_ids": list(range(1001))}, "recent_item_ids"),
        ({"user_id": 1, "recent_item_ids": [-1]}, "recent_item_ids"),
        ({"user_id": 1, "colour": "red"}, "colour"),
    ],
)
def test_bad_requests_get_422_naming_the_field(http, body, field):
    response = http.post("/v1/recommend", json=body)
    assert response.status_code == 422
    assert field in response.text


def test_malformed_json_gets_422(http):
    response = http.post(
        "/v1/recommend", content=b'{"user_id": 4', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON decode error" in response.text


def test_health_readiness_metrics_and_docs(http, bundle, known_user):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready", "model_version": bundle.version}
    recommend(http, user_id=known_user, k=3)
    assert http.post("/v1/recommend", json={"user_id": known_user, "k": 0}).status_code == 422
    assert http.get("/no/such/path").status_code == 404
    metrics = http.get("/metrics").text
    assert 'recsys_requests_total{code="200",endpoint="/v1/recommend",transport="http"}' in metrics
    assert 'recsys_requests_total{code="422",endpoint="/v1/recommend",transport="http"}' in metrics
    assert 'recsys_requests_total{code="404",endpoint="unmatched",transport="http"}' in metrics
    assert 'recsys_stage_duration_seconds_bucket{le="0.0005",stage="retrieve"}' in metrics
    assert 'recsys_stage_duration_seconds_count{stage="rank"}' in metrics
    assert f'version="{bundle.version}"' in metrics
    assert http.get("/docs").status_code == 200
    assert "/v1/recommend" in http.get("/openapi.json").json()["paths"]


def as_request(**fields) -> pb.RecommendRequest:
    context = fields.pop("context", None)
    return pb.RecommendRequest(context=pb.Context(**context) if context else None, **fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"k": 10},
        {"k": 7, "candidates": 30, "context": {"hour": 5, "weekday": 6}},
        {"k": 4, "strategy": "knn_embed"},
    ],
)
def test_grpc_and_http_answer_identically(http, stub, known_user, fields):
    over_http = recommend(http, user_id=known_user, **fields)
    over_grpc = stub.Recommend(as_request(user_id=known_user, **fields), timeout=10)
    assert over_grpc.model_version == over_http["model_version"]
    assert over_grpc.degraded == over_http["degraded"]
    assert {"model": over_grpc.ranker.model, "variant": over_grpc.ranker.variant} == over_http[
        "ranker"
    ]
    assert [(i.item_id, i.score) for i in over_grpc.items] == [
        (i["item_id"], i["score"]) for i in over_http["items"]
    ]


def test_grpc_candidates_match_http(http, stub, known_user):
    over_http = http.post("/v1/candidates", json={"user_id": known_user, "k": 5}).json()
    over_grpc = stub.Candidates(pb.RecommendRequest(user_id=known_user, k=5), timeout=10)
    assert [(c.item_id, c.score, c.source) for c in over_grpc.candidates] == [
        (c["item_id"], c["score"], c["source"]) for c in over_http["candidates"]
    ]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"user_id": 1, "k": 0}, "k"),
        ({"user_id": 1, "k": 501}, "k"),
        ({"user_id": 1, "k": -3}, "k"),
        ({"user_id": 1, "k": 20, "candidates": 10}, "candidates"),
        ({"user_id": 1, "strategy": "random"}, "strategy"),
        ({"user_id": 1, "context": {"hour": 99}}, "context.hour"),
        ({"user_id": 1, "recent_item_ids": list(range(1001))}, "recent_item_ids"),
    ],
)
def test_grpc_bad_requests_get_invalid_argument(stub, request_fields, field):
    with pytest.raises(grpc.RpcError) as error:
        stub.Recommend(as_request(**request_fields), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


def test_grpc_unknown_user_gets_popular_items(stub, bundle):
    response = stub.Recommend(pb.RecommendRequest(user_id=123, k=3), timeout=10)
    assert len(response.items) == 3
    assert {i.item_id for i in response.items} <= {int(i) for i in bundle.popular.items[:200]}


def test_grpc_health_and_reflection(service):
    channel = service[1]
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "recsys.v1.Recommender"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"recsys.v1.Recommender", "grpc.health.v1.Health"} <= services
    replies = list(
        reflection.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="recsys.v1.Recommender"
                    )
                ]
            ),
            timeout=5,
        )
    )
    proto = descriptor_pb2.FileDescriptorProto.FromString(
        replies[0].file_descriptor_response.file_descriptor_proto[0]
    )
    assert proto.package == "recsys.v1"


def test_popular_candidates_score_on_the_two_tower_scale(http, bundle):
    """The ranker reads retrieval scores as two-tower cosines, popular candidates included."""
    candidates = http.post("/v1/candidates", json={"user_id": 2**64 - 1, "k": 5}).json()[
        "candidates"
    ]
    ids = np.array([c["item_id"] for c in candidates[:20]], dtype=np.uint64)
    expected = bundle.index.reconstruct(ids) @ cold_user_vector(bundle.two_tower)
    np.testing.assert_allclose(
        [c["score"] for c in candidates[:20]], expected, rtol=1e-5, atol=1e-6
    )


def test_similar_items_are_an_items_nearest_by_vector_over_http_and_grpc(http, stub, bundle):
    catalog = bundle.features.items.ids
    vectors = item_vectors(bundle.two_tower, bundle.features)  # as the index holds them
    item = int(catalog[np.argmax(bundle.features.item_counts[1:])])
    own = vectors[np.flatnonzero(catalog == item)[0]]
    exact = [int(catalog[i]) for i in np.argsort(-(vectors @ own)) if catalog[i] != item][:5]

    response = http.post("/v1/similar-items", json={"item_id": item, "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["item_id"] == item and body["degraded"] is False
    assert body["model_version"] == bundle.version
    assert [i["item_id"] for i in body["items"]] == exact  # the item itself left out
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)

    answer = stub.SimilarItems(pb.SimilarItemsRequest(item_id=item, k=5), timeout=5)
    assert [(i.item_id, round(i.score, 5)) for i in answer.items] == [
        (i["item_id"], round(i["score"], 5)) for i in body["items"]
    ]
    assert len(stub.SimilarItems(pb.SimilarItemsRequest(item_id=item), timeout=5).items) == 10


def test_similar_items_of_an_unknown_item_is_not_found_and_bad_input_is_refused(http, stub):
    unknown = 2**64 - 3
    response = http.post("/v1/similar-items", json={"item_id": unknown})
    assert response.status_code == 404 and str(unknown) in response.json()["detail"]
    with pytest.raises(grpc.RpcError) as refused:
        stub.SimilarItems(pb.SimilarItemsRequest(item_id=unknown), timeout=5)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert str(unknown) in refused.value.details()
    for body in ({"item_id": 1, "k": 0}, {"item_id": -1}, {"item_id": 1, "colour": 3}, {}):
        assert http.post("/v1/similar-items", json=body).status_code == 422, body
    with pytest.raises(grpc.RpcError) as refused:
        stub.SimilarItems(pb.SimilarItemsRequest(item_id=1, k=501), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "k" in refused.value.details()


def test_similar_items_with_the_item_table_down_answer_degraded_not_an_error(bundle):
    pipeline = RecommendPipeline(bundle, DegradedReads(in_memory_store(bundle)))
    known = int(bundle.features.items.ids[0])
    # A catalogue item still has its attributes: answered from them, flagged degraded.
    from_attributes = pipeline.similar_items(SimilarItemsRequest(item_id=known, k=5))
    assert from_attributes.degraded and len(from_attributes.items) == 5
    assert known not in {i.item_id for i in from_attributes.items}
    # An item only the table could know: the popular items, flagged degraded.
    unknown = pipeline.similar_items(SimilarItemsRequest(item_id=2**64 - 3, k=5))
    popular = bundle.popular.top(5, np.empty(0, np.uint64)).item_ids.tolist()
    assert unknown.degraded and [i.item_id for i in unknown.items] == popular


def categories_of(dataset) -> dict[int, str]:
    return dict(zip(dataset.items["item_id"].astype("uint64").tolist(), dataset.items["category"]))


@pytest.mark.parametrize("strategy", ["two_tower", "knn_embed"])
def test_a_filter_holds_for_every_candidate_source_over_http_and_grpc(
    http, stub, tiny_dataset, known_user, strategy
):
    category = categories_of(tiny_dataset)
    wanted = {"c1", "c4"}
    asked = {
        "user_id": known_user,
        "k": 8,
        "candidates": 60,
        "strategy": strategy,
        "filter": {"category": {"in": sorted(wanted)}},
    }
    candidates = http.post("/v1/candidates", json=asked).json()["candidates"]
    assert len(candidates) == 60  # the budget is met inside the filter
    assert {category[c["item_id"]] for c in candidates} <= wanted
    answer = recommend(http, **asked)
    assert len(answer["items"]) == 8
    assert {category[i["item_id"]] for i in answer["items"]} <= wanted
    over_grpc = stub.Recommend(as_request(**asked), timeout=10)
    assert [i.item_id for i in over_grpc.items] == [i["item_id"] for i in answer["items"]]
    # not_in, ANDed with in, and a cold user's popular items are filtered as well.
    for user in (known_user, 2**64 - 2):
        narrowed = {
            "user_id": user,
            "k": 10,
            "filter": {"category": {"in": ["c1", "c4"], "not_in": ["c4"]}},
        }
        items = http.post("/v1/candidates", json=narrowed).json()["candidates"]
        assert len(items) > 0 and {category[c["item_id"]] for c in items} == {"c1"}


def test_a_filter_on_an_attribute_the_catalog_lacks_is_refused_on_both_transports(http, stub):
    asked = {"user_id": 1, "filter": {"colour": {"in": ["red"]}}}
    response = http.post("/v1/recommend", json=asked)
    assert response.status_code == 422
    assert "'colour'" in response.json()["detail"] and "category" in response.json()["detail"]
    with pytest.raises(grpc.RpcError) as refused:
        stub.Recommend(as_request(**asked), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'colour'" in refused.value.details()
    for malformed in (
        {"category": {}},
        {"category": {"in": []}},
        {"category": ["c1"]},
        {"a=b": {"in": ["x"]}},
    ):
        response = http.post("/v1/recommend", json={"user_id": 1, "filter": malformed})
        assert response.status_code == 422, malformed
    with pytest.raises(grpc.RpcError) as refused:
        stub.Recommend(pb.RecommendRequest(user_id=1, filter={"category": {}}), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_similar_items_inside_a_filter(http, stub, bundle, tiny_dataset):
    category = categories_of(tiny_dataset)
    item = int(bundle.features.items.ids[0])
    other = sorted({c for c in category.values() if c != category[item]})[0]
    asked = {"item_id": item, "k": 6, "filter": {"category": {"in": [other]}}}
    body = http.post("/v1/similar-items", json=asked).json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 6 and {category[i] for i in ids} == {other}
    answer = stub.SimilarItems(
        pb.SimilarItemsRequest(item_id=item, k=6, filter={"category": {"in": [other]}}), timeout=5
    )
    assert [i.item_id for i in answer.items] == ids
    refused = http.post("/v1/similar-items", json={"item_id": item, "filter": {"x": {"in": ["y"]}}})
    assert refused.status_code == 422
