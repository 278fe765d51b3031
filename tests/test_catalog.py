"""The catalog at run time: items upserted with attributes, hidden, unhidden and deleted,
in the catalog itself, in the index, on the catalog feed's Redis layout, and through the
Admin API on two serving processes sharing one Redis (and one restarted)."""

import time
import uuid

import grpc
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.online.memory_streams import InMemoryCatalogFeed
from service.online.redis_streams import RedisCatalogFeed
from service.online.streams import CatalogChange, CatalogFeed
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval import index as index_module
from service.retrieval.catalog import ItemCatalog
from service.retrieval.index import ItemIndex
from service.schemas import AttributeCondition
from tests.test_admin import serve

TOKEN = "catalog-admin-token-for-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
GRPC_BEARER = (("authorization", f"Bearer {TOKEN}"),)


def condition(**fields) -> AttributeCondition:
    return AttributeCondition.model_validate(fields)


def red_items(catalog: ItemCatalog) -> list[int]:
    return catalog.allowed({"colour": condition(**{"in": ["red"]})}).ids.tolist()


@pytest.fixture
def catalog() -> ItemCatalog:
    """Items 10 (red), 11 (blue), 12 (red)."""
    rows = np.array([[0], [1], [2], [1]], np.int64)
    return ItemCatalog(np.array([10, 11, 12], np.uint64), rows, ["colour=red", "colour=blue"])


def test_upserts_hides_and_deletes_change_what_filters_keep(catalog):
    assert red_items(catalog) == [10, 12]
    catalog.upsert(
        np.array([11, 99], np.uint64), [{"colour": ["red"]}, {"colour": ["red", "pink"]}]
    )
    assert red_items(catalog) == [10, 11, 12, 99]  # 11 repainted, 99 new
    assert catalog.allowed({"colour": condition(**{"in": ["blue"]})}).ids.tolist() == []
    catalog.upsert(np.array([98], np.uint64), [{"size": ["xl"]}])
    assert catalog.columns == ["colour", "size"]
    assert catalog.allowed({"size": condition(**{"in": ["xl"]})}).ids.tolist() == [98]
    catalog.hide(np.array([10, 99], np.uint64))
    assert red_items(catalog) == [11, 12] and catalog.blocked.tolist() == [10, 99]
    catalog.unhide(np.array([99], np.uint64))
    assert red_items(catalog) == [11, 12, 99]
    catalog.delete(np.array([12, 99], np.uint64))
    assert red_items(catalog) == [11]
    assert catalog.holds(np.array([11, 12, 99, 98], np.uint64)).tolist() == [
        True,
        False,
        False,
        True,
    ]
    assert catalog.blocked.tolist() == [10, 12, 99]
    catalog.upsert(np.array([12], np.uint64), [{"colour": ["red"]}])  # back, as upserted
    assert red_items(catalog) == [11, 12] and catalog.blocked.tolist() == [10, 99]
    # The models see the values the artifact knows; "pink" has no embedding.
    catalog.upsert(np.array([97], np.uint64), [{"colour": ["pink", "blue"]}])
    assert catalog.attribute_rows(np.array([97, 10, 5], np.uint64))[:, 0].tolist() == [2, 1, 0]


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16"])
def test_a_removed_item_is_found_by_no_search_until_it_is_upserted_again(factory, monkeypatch):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2_000, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1, 2_001, dtype=np.uint64)
    index = ItemIndex.build(ids, vectors, factory)
    target = ids[5:6]
    catalog = ItemCatalog(ids, np.zeros((2_001, 1), np.int64), [])
    catalog.upsert(ids[:50], [{"kind": ["a"]}] * 50)
    kept = catalog.allowed({"kind": condition(**{"in": ["a"]})})
    monkeypatch.setattr(index_module, "FLAT_MAX_ITEMS", 1_000)
    assert index.search(vectors[5:6], 1, kept)[1][0, 0] == target[0]
    assert index.remove(target) == 1
    assert len(index) == 1_999
    assert target[0] not in index.search(vectors[5:6], 50)[1][0]
    assert target[0] not in index.search(vectors[5:6], 50, kept)[1][0]  # the exact path too
    index.upsert(target, vectors[5:6])
    index.contents_changed()
    assert index.search(vectors[5:6], 1)[1][0, 0] == target[0]
    assert index.search(vectors[5:6], 1, kept)[1][0, 0] == target[0]


def feed_round_trip(feed: CatalogFeed) -> None:
    feed.publish(CatalogChange("upsert", np.array([7, 3], np.uint64), [{"c": ["x"]}, {}]))
    feed.publish(CatalogChange("hide", np.array([2**64 - 1], np.uint64)))
    cursor, changes = feed.read(CatalogFeed.START, 0)
    assert [c.op for c in changes] == ["upsert", "hide"]
    assert changes[0].item_ids.tolist() == [7, 3] and changes[0].attributes == [{"c": ["x"]}, {}]
    assert changes[1].item_ids.tolist() == [2**64 - 1] and changes[1].attributes is None
    assert feed.read(cursor, 0) == (cursor, [])


def test_the_catalog_feed_layout_on_redis_and_in_process(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    namespace = uuid.uuid4().hex[:8]
    feed_round_trip(RedisCatalogFeed(client, f"catalog-{namespace}"))
    [(_, upsert), (_, hide)] = client.xrange(f"catalog-{namespace}")
    assert upsert == {
        b"op": b"upsert",
        b"ids": (7).to_bytes(8, "little") + (3).to_bytes(8, "little"),
        b"attributes": b'[{"c": ["x"]}, {}]',
    }
    assert hide == {b"op": b"hide", b"ids": b"\xff" * 8, b"attributes": b""}
    client.close()
    feed_round_trip(InMemoryCatalogFeed())


def replica(artifacts, redis_url: str, namespace: str):
    return serve(
        artifacts,
        admin_token=TOKEN,
        redis_url=redis_url,
        redis_namespace=namespace,
        catalog_stream=f"catalog-{namespace}",
        online_trainer="off",
    )


@pytest.fixture
def replicas(artifact_root, redis_server):
    """Two serving processes' apps on one Redis and namespace, as two replicas are."""
    namespace = uuid.uuid4().hex[:8]
    started = [replica(artifact_root, redis_server.url, namespace) for _ in range(2)]
    for client, _ in started:
        client.__enter__()
    yield started, namespace
    for client, _ in started:
        client.__exit__(None, None, None)


def answered(client: TestClient, user: int, **body) -> list[int]:
    response = client.post("/v1/recommend", json={"user_id": user, "k": 10, **body})
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


def within(seconds: float, check) -> float:
    """Seconds until `check()` holds, failing past `seconds`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "not within the time allowed"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_hidden_item_leaves_every_replica_within_two_seconds_and_comes_back(
    replicas, known_user, artifact_root, redis_server
):
    (first, _), (second, second_address) = replicas[0]
    item = answered(first, known_user)[0]
    assert item in answered(second, known_user)
    hidden = first.post("/admin/v1/items/hide", json={"item_ids": [item]}, headers=BEARER)
    assert hidden.status_code == 202 and hidden.json() == {"items": 1}
    for client in (first, second):
        within(2.0, lambda c=client: item not in answered(c, known_user))
        assert len(answered(client, known_user)) == 10
        cold = client.post("/v1/candidates", json={"user_id": 2**64 - 2, "k": 10}).json()
        assert item not in [c["item_id"] for c in cold["candidates"]]  # popular items too
        others = client.post("/v1/similar-items", json={"item_id": item, "k": 20}).json()
        assert item not in [i["item_id"] for i in others["items"]]
    # A replica started later (a restart) replays the feed before it serves.
    restarted, _ = replica(artifact_root, redis_server.url, replicas[1])
    with restarted:
        assert item not in answered(restarted, known_user)
    with grpc.insecure_channel(second_address) as channel:
        shown = pb_grpc.AdminStub(channel).UnhideItems(
            pb.ItemIdsRequest(item_ids=[item]), metadata=GRPC_BEARER, timeout=5
        )
    assert shown.items == 1
    for client in (first, second):
        within(2.0, lambda c=client: item in answered(c, known_user))


def test_an_upserted_item_is_answered_from_its_attributes_before_any_click(replicas, known_user):
    (first, first_address), (second, _) = replicas[0]
    new_item = 2**63 + 12_345
    with grpc.insecure_channel(first_address) as channel:
        upserted = pb_grpc.AdminStub(channel).UpsertItems(
            pb.UpsertItemsRequest(
                items=[
                    pb.CatalogItem(
                        item_id=new_item,
                        attributes={"category": pb.AttributeValues(values=["c1", "launch"])},
                    )
                ]
            ),
            metadata=GRPC_BEARER,
            timeout=5,
        )
    assert upserted.items == 1
    launch = {"filter": {"category": {"in": ["launch"]}}}
    for client in (first, second):
        within(2.0, lambda c=client: answered(c, known_user, **launch) == [new_item])
        similar = client.post("/v1/similar-items", json={"item_id": new_item, "k": 5})
        assert similar.status_code == 200 and len(similar.json()["items"]) == 5
    deleted = second.post("/admin/v1/items/delete", json={"item_ids": [new_item]}, headers=BEARER)
    assert deleted.status_code == 202
    for client in (first, second):
        within(2.0, lambda c=client: answered(c, known_user, **launch) == [])
        assert client.post("/v1/similar-items", json={"item_id": new_item}).status_code == 404


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/admin/v1/items", {"items": []}),
        ("/admin/v1/items", {"items": [{"item_id": 1}, {"item_id": 1}]}),
        ("/admin/v1/items", {"items": [{"item_id": 1, "attributes": {"a=b": ["x"]}}]}),
        ("/admin/v1/items", {"items": [{"item_id": -1}]}),
        ("/admin/v1/items/hide", {"item_ids": []}),
        ("/admin/v1/items/unhide", {"item_ids": ["x"]}),
        ("/admin/v1/items/delete", {}),
    ],
)
def test_bad_catalog_changes_are_refused_and_need_the_token(replicas, path, body):
    (client, address), _ = replicas[0]
    assert client.post(path, json=body, headers=BEARER).status_code == 422
    assert client.post(path, json={"item_ids": [1]}).status_code == 401
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AdminStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.HideItems(pb.ItemIdsRequest(), metadata=GRPC_BEARER, timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as refused:
            stub.HideItems(pb.ItemIdsRequest(item_ids=[1]), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
