"""recsys.v1.Admin over real gRPC and HTTP: off without a token, refused without the right
one, index reload, item-vector upsert and table-snapshot import with it; bad vectors and
snapshots outside the artifact root refused."""

import shutil
import time

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.embedded import build_app
from service.artifact_tables import in_memory_store
from service.bundle import ModelBundle
from service.embeddings.memory_store import InMemoryEmbeddingStore
from service.embeddings.snapshot import export_table
from service.embeddings.store import TableConfig
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.index_versions import build_index_version, table_item_vectors
from service.settings import Settings
from service.testing.redis_servers import free_port

TOKEN = "s3cret-admin-token-for-tests"
BEARER = (("authorization", f"Bearer {TOKEN}"),)


def serve(artifacts, **settings):
    settings = Settings(
        artifacts=artifacts,
        host="127.0.0.1",
        grpc_port=free_port(),
        grpc_workers=4,
        index_poll_seconds=0,
        **settings,
    )
    return TestClient(build_app(settings)), f"127.0.0.1:{settings.grpc_port}"


@pytest.fixture(scope="module")
def own_artifact(artifact_root, tmp_path_factory):
    """A private copy of the tiny artifact: reload tests add index versions to it."""
    folder = ModelBundle.load(artifact_root).folder
    return shutil.copytree(folder, tmp_path_factory.mktemp("admin") / folder.name)


@pytest.fixture(scope="module")
def admin(own_artifact):
    client, address = serve(own_artifact, admin_token=TOKEN)
    with client, grpc.insecure_channel(address) as channel:
        yield client, pb_grpc.AdminStub(channel)


def test_admin_is_off_without_a_token(artifact_root):
    client, address = serve(artifact_root)
    with client, grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.AdminStub(channel).ReloadIndex(
                pb.ReloadIndexRequest(), metadata=BEARER, timeout=5
            )
        assert client.post("/admin/v1/index/reload", headers=dict(BEARER)).status_code == 404
        assert not any(
            path.startswith("/admin") for path in client.get("/openapi.json").json()["paths"]
        )
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong-token-of-same-size!"),), (("authorization", TOKEN),)],
)
def test_admin_refuses_a_missing_or_wrong_token(admin, metadata):
    http, stub = admin
    for call, request in (
        (stub.ReloadIndex, pb.ReloadIndexRequest()),
        (stub.UpsertItemVectors, pb.UpsertItemVectorsRequest()),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call(request, metadata=metadata, timeout=5)
        assert (
            refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            and "Bearer" in refused.value.details()
        )
    for path, body in (
        ("/admin/v1/index/reload", None),
        ("/admin/v1/items/vectors", {"items": [{"item_id": 1, "vector": [0.5]}]}),
    ):
        refused = http.post(path, json=body, headers=dict(metadata))
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", (
            refused.text
        )


def test_reload_swaps_to_a_new_index_version_now(admin, own_artifact):
    http, stub = admin
    app = http.app
    before = stub.ReloadIndex(pb.ReloadIndexRequest(), metadata=BEARER, timeout=10)
    assert not before.swapped and before.index_version
    bundle = app.state.pipeline.bundle
    ids, vectors = table_item_vectors(bundle, in_memory_store(bundle))
    version = build_index_version(own_artifact, ids, vectors, "IVF4,Flat")
    after = stub.ReloadIndex(pb.ReloadIndexRequest(), metadata=BEARER, timeout=30)
    assert after.swapped and after.index_version == version.name
    assert "IVF" in bundle.index.description
    version = build_index_version(own_artifact, ids, vectors, "Flat")  # the same call over HTTP
    assert http.post("/admin/v1/index/reload", headers=dict(BEARER)).json() == {
        "swapped": True,
        "index_version": version.name,
    }
    assert "Flat" in bundle.index.description and "IVF" not in bundle.index.description


def test_upserted_item_vectors_reach_the_index(admin):
    http, stub = admin
    app = http.app
    bundle = app.state.pipeline.bundle
    store = app.state.pipeline.store
    new_items = [2**64 - 11, 2**64 - 12]
    vectors = store.get_many("item", bundle.features.items.ids[:2]).vectors
    before = len(bundle.index)
    request = pb.UpsertItemVectorsRequest(
        items=[pb.ItemVector(item_id=i, vector=v.tolist()) for i, v in zip(new_items, vectors)]
    )
    assert stub.UpsertItemVectors(request, metadata=BEARER, timeout=10).upserted == 2
    np.testing.assert_allclose(store.get_many("item", new_items).vectors, vectors)
    deadline = time.monotonic() + 10
    while len(bundle.index) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(bundle.index) == before + 2  # index sync re-embedded both new items
    over_http = {"items": [{"item_id": 2**64 - 13, "vector": vectors[0].tolist()}]}
    assert http.post("/admin/v1/items/vectors", json=over_http, headers=dict(BEARER)).json() == {
        "upserted": 1
    }
    assert store.get_many("item", [2**64 - 13]).found[0]


@pytest.mark.parametrize(
    "items, message",
    [
        ([], "items"),
        ([(1, [0.5, 0.5])], "dimensions"),
        ([(1, None), (1, None)], "distinct"),
        ([(1, "nan")], "finite"),
        ([(1, "inf")], "finite"),
    ],
)
def test_bad_vectors_are_refused_and_nothing_is_written(admin, items, message):
    http, stub = admin
    store = http.app.state.pipeline.store
    dim = store.table("item").dim

    def vector(spec) -> list[float]:
        if spec is None:
            return [0.1] * dim
        if isinstance(spec, str):
            return [float(spec)] + [0.1] * (dim - 1)
        return spec

    request = pb.UpsertItemVectorsRequest(
        items=[pb.ItemVector(item_id=i, vector=vector(v)) for i, v in items]
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub.UpsertItemVectors(request, metadata=BEARER, timeout=5)
    assert (
        refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and message in refused.value.details()
    )
    if not any(isinstance(v, str) for _, v in items):  # JSON has no NaN or Infinity to send
        body = {"items": [{"item_id": i, "vector": vector(v)} for i, v in items]}
        over_http = http.post("/admin/v1/items/vectors", json=body, headers=dict(BEARER))
        assert over_http.status_code == 422 and message in over_http.text, over_http.text
    assert not store.get_many("item", [1]).found[0]


def test_a_short_admin_token_is_refused_at_startup():
    with pytest.raises(ValidationError, match="admin_token"):
        Settings(admin_token="short")


def snapshot(folder, name: str, ids, vectors) -> str:
    """A table snapshot as `recsys table export` writes it, under the artifact; its relative path."""
    (folder / "snapshots").mkdir(exist_ok=True)
    if np.isfinite(vectors).all():
        store = InMemoryEmbeddingStore([TableConfig("item", vectors.shape[1])])
        store.put_many("item", np.array(ids, np.uint64), vectors)
        export_table(store, "item", folder / "snapshots" / name)
    else:  # no store holds such rows: written by hand in the same format
        dim = vectors.shape[1]
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
        pq.write_table(
            pa.table({"id": pa.array(ids, pa.uint64()), "vector": column}),
            folder / "snapshots" / name,
        )
    return f"snapshots/{name}"


def test_a_table_snapshot_is_imported_and_its_items_reach_the_index(admin, own_artifact):
    http, stub = admin
    bundle, store = http.app.state.pipeline.bundle, http.app.state.pipeline.store
    new_items = [2**64 - 21, 2**64 - 22, 2**64 - 23]
    vectors = store.get_many("item", bundle.features.items.ids[:3]).vectors
    before = len(bundle.index)
    path = snapshot(own_artifact, "new-items.parquet", new_items, vectors)
    assert (
        stub.ImportTable(
            pb.ImportTableRequest(table="item", path=path), metadata=BEARER, timeout=30
        ).rows
        == 3
    )
    np.testing.assert_allclose(store.get_many("item", new_items).vectors, vectors)
    deadline = time.monotonic() + 10
    while len(bundle.index) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(bundle.index) == before + 3  # announced: index sync re-embedded them
    again = snapshot(own_artifact, "one-more.parquet", [2**64 - 24], vectors[:1])
    body = {"table": "item", "path": again}
    assert http.post("/admin/v1/tables/import", json=body, headers=dict(BEARER)).json() == {
        "rows": 1
    }
    assert store.get_many("item", [2**64 - 24]).found[0]
    refused = http.post("/admin/v1/tables/import", json=body)
    assert refused.status_code == 401


def test_a_snapshot_outside_the_artifact_root_or_unusable_is_refused_and_nothing_is_written(
    admin, own_artifact, tmp_path
):
    http, stub = admin
    store = http.app.state.pipeline.store
    dim = store.table("item").dim
    outside = tmp_path / "outside.parquet"
    export_table(store, "item", outside)  # a real snapshot, in the wrong place
    (own_artifact / "snapshots").mkdir(exist_ok=True)
    (own_artifact / "snapshots" / "escape.parquet").symlink_to(outside)
    bad = np.full((1, dim), 0.5, np.float32)
    bad[0, 0] = np.nan
    cases = [
        ("item", str(outside), "outside the artifact root"),
        ("item", "../outside.parquet", "outside the artifact root"),
        ("item", "snapshots/escape.parquet", "outside the artifact root"),
        ("item", "snapshots/missing.parquet", "no file"),
        ("item", "manifest.json", "not a table snapshot"),
        ("nope", "snapshots/escape.parquet", "no embedding table"),
        ("item", snapshot(own_artifact, "nan.parquet", [2**64 - 31], bad), "NaN"),
        (
            "user",
            snapshot(own_artifact, "wide.parquet", [2**64 - 32], np.ones((1, dim + 1), np.float32)),
            "dims",
        ),
    ]
    for table, path, message in cases:
        with pytest.raises(grpc.RpcError) as refused:
            stub.ImportTable(
                pb.ImportTableRequest(table=table, path=path), metadata=BEARER, timeout=10
            )
        assert (
            refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and message in refused.value.details()
        ), (path, refused.value.details())
        over_http = http.post(
            "/admin/v1/tables/import", json={"table": table, "path": path}, headers=dict(BEARER)
        )
        assert over_http.status_code == 422 and message in over_http.text, over_http.text
    assert not store.get_many("item", [2**64 - 31]).found[0]
