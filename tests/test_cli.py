import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from service.artifacts import ranker_variant_figures, resolve_version
from service.bundle import ModelBundle
from service.cli import app
from service.data.synthetic import SyntheticConfig, generate
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig


def test_train_from_files_indexes_catalog_only_items(tmp_path):
    data = generate(SyntheticConfig(users=80, items=120, categories=4, seed=3))
    data.interactions[["user_id", "item_id", "timestamp"]].to_csv(
        tmp_path / "clicks.csv", index=False
    )
    cold = pd.DataFrame(
        {"item_id": np.array([2**64 - 5, 2**64 - 6], dtype=np.uint64), "category": ["c1", "c2"]}
    )
    pd.concat([data.items, cold]).to_parquet(tmp_path / "items.parquet")
    out = tmp_path / "artifacts"
    args = [
        "train",
        "--interactions",
        str(tmp_path / "clicks.csv"),
        "--items",
        str(tmp_path / "items.parquet"),
        "--out",
        str(out),
        "--two-tower-epochs",
        "4",
        "--ranker-epochs",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((resolve_version(out) / "manifest.json").read_text())
    assert manifest["data_schema"]["catalog_items"] == 122
    assert manifest["data_schema"]["item_attributes"] == ["category"]
    bundle = ModelBundle.load(out)
    assert len(bundle.index) == 122
    # never clicked, so embedded from attributes alone: each cold item sits nearer to its
    # own category than the other cold item does
    cold_c1, cold_c2 = bundle.index.reconstruct(cold["item_id"].to_numpy())
    warm = bundle.index.reconstruct(data.items["item_id"].to_numpy())
    in_c1 = (data.items["category"] == "c1").to_numpy()
    in_c2 = (data.items["category"] == "c2").to_numpy()
    assert (warm[in_c1] @ cold_c1).mean() > (warm[in_c1] @ cold_c2).mean()
    assert (warm[in_c2] @ cold_c2).mean() > (warm[in_c2] @ cold_c1).mean()

    again = CliRunner().invoke(app, [*args, "--if-missing"])
    assert again.exit_code == 0 and "not training" in again.output
    assert len([p for p in out.iterdir() if not p.name.startswith(".")]) == 1


def test_train_refuses_bad_input_with_a_message(tmp_path):
    (tmp_path / "clicks.csv").write_text("user,item\n1,2\n")
    result = CliRunner().invoke(
        app, ["train", "--interactions", str(tmp_path / "clicks.csv"), "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 2
    assert "lack column" in result.output
    result = CliRunner().invoke(
        app, ["train", "--dataset", "netflix", "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 2 and "unknown dataset" in result.output


def test_table_load_export_import_round_trip_through_redis(
    artifact_root, bundle, redis_server, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq
    import redis

    monkeypatch.setenv("RECSYS_REDIS_URL", redis_server.url)
    monkeypatch.setenv("RECSYS_REDIS_NAMESPACE", "snap")
    runner = CliRunner()
    result = runner.invoke(app, ["table", "load", "--artifacts", str(artifact_root)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "users.parquet"
    result = runner.invoke(
        app,
        [
            "table",
            "export",
            "--table",
            "user",
            "--out",
            str(out),
            "--artifacts",
            str(artifact_root),
        ],
    )
    assert result.exit_code == 0, result.output
    snapshot = pq.read_table(out)
    assert (
        snapshot.schema.field("id").type == "uint64"
        and snapshot.schema.metadata[b"table"] == b"user"
    )
    exported = dict(zip(snapshot.column("id").to_pylist(), snapshot.column("vector").to_pylist()))
    expected = bundle.two_tower.state_dict()["user_id.weight"][1:].numpy()
    assert len(exported) == len(bundle.features.users)
    first = int(bundle.features.users.ids[0])
    np.testing.assert_array_equal(np.array(exported[first], np.float32), expected[0])

    redis.Redis.from_url(redis_server.url).delete(
        *redis.Redis.from_url(redis_server.url).keys(b"emb:{snap.user:*")
    )
    result = runner.invoke(
        app, ["table", "import", str(out), "--table", "user", "--artifacts", str(artifact_root)]
    )
    assert result.exit_code == 0, result.output
    assert "imported 200 rows" in result.output
    lookup = RedisEmbeddingStore(
        bundle.tables(), RedisStoreConfig(redis_server.url, namespace="snap", cache_entries=0)
    ).get_many("user", bundle.features.users.ids)
    assert lookup.found.all()
    np.testing.assert_array_equal(lookup.vectors, expected)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa_table_with_dim(3), bad)
    result = runner.invoke(
        app, ["table", "import", str(bad), "--table", "user", "--artifacts", str(artifact_root)]
    )
    assert result.exit_code == 2 and "takes 64" in result.output


def pa_table_with_dim(dim: int):
    import pyarrow as pa

    flat = pa.array(np.zeros(dim, np.float32))
    return pa.table(
        {"id": pa.array([1], pa.uint64()), "vector": pa.FixedSizeListArray.from_arrays(flat, dim)}
    )


def test_index_build_publishes_a_version_the_next_load_serves(artifact_root, tmp_path):
    import shutil

    folder = shutil.copytree(
        resolve_version(artifact_root), tmp_path / resolve_version(artifact_root).name
    )
    result = CliRunner().invoke(
        app, ["index", "build", "--factory", "HNSW32", "--artifacts", str(folder)]
    )
    assert result.exit_code == 0, result.output
    bundle = ModelBundle.load(folder)
    assert bundle.index_version != "artifact" and "HNSW" in bundle.index.description
    assert len(bundle.index) == len(bundle.features.items)
    manifest = json.loads((folder / "indexes" / bundle.index_version / "index.json").read_text())
    assert manifest["factory"] == "HNSW32" and manifest["items"] == len(bundle.features.items)


def test_knn_embed_refresh_rewrites_the_smoothing_in_redis(
    artifact_root, bundle, redis_server, monkeypatch
):
    from service.embeddings.tables import SMOOTHING_TABLE
    from service.retrieval.knn_embed import neighbour_mixtures, normalise_rows
    from service.retrieval.two_tower import user_vectors

    runner = CliRunner()
    monkeypatch.delenv("RECSYS_REDIS_URL", raising=False)
    refused = runner.invoke(app, ["knn-embed", "refresh", "--artifacts", str(artifact_root)])
    assert refused.exit_code == 2 and "RECSYS_REDIS_URL" in refused.output

    monkeypatch.setenv("RECSYS_REDIS_URL", redis_server.url)
    monkeypatch.setenv("RECSYS_REDIS_NAMESPACE", "smooth")
    assert runner.invoke(app, ["table", "load", "--artifacts", str(artifact_root)]).exit_code == 0
    store = RedisEmbeddingStore(
        bundle.tables(), RedisStoreConfig(redis_server.url, namespace="smooth", cache_entries=0)
    )
    users = bundle.mixtures.user_ids
    store.delete(SMOOTHING_TABLE, users)
    result = runner.invoke(
        app, ["knn-embed", "refresh", "--neighbours", "3", "--artifacts", str(artifact_root)]
    )
    assert result.exit_code == 0, result.output
    assert f"rewritten for {len(users)} users" in result.output
    lookup = store.get_many(SMOOTHING_TABLE, users)
    assert lookup.found.all()
    # Means of 3 neighbours' mixtures now, not of the artifact's 10.
    vectors = user_vectors(bundle.two_tower, bundle.features, bundle.histories)
    expected = neighbour_mixtures(vectors, normalise_rows(bundle.mixtures.counts), 3)
    assert np.isclose(lookup.vectors, expected, atol=1e-5).all(1).mean() > 0.9
    assert np.isclose(lookup.vectors, bundle.mixtures.smoothing, atol=1e-5).all(1).mean() < 0.1


def test_train_with_the_dcn_v2_ranker_serves_and_reports_it(tmp_path):
    from prometheus_client import REGISTRY

    from service.cli import RankerModel
    from service.pipeline.in_process import RecommendPipeline
    from service.ranking.dcn_v2 import DCNv2
    from service.ranking.models import RANKERS
    from service.schemas import RecommendRequest

    assert {m.value for m in RankerModel} == set(RANKERS)
    data = generate(SyntheticConfig(users=60, items=90, categories=3, seed=5))
    data.interactions[["user_id", "item_id", "timestamp"]].to_csv(
        tmp_path / "clicks.csv", index=False
    )
    out = tmp_path / "artifacts"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--interactions",
            str(tmp_path / "clicks.csv"),
            "--out",
            str(out),
            "--two-tower-epochs",
            "2",
            "--ranker-epochs",
            "1",
            "--ranker",
            "dcn_v2",
            "--ranker-rank",
            "3",
            "--user-id-dropout",
            "0.3",
            "--no-validate",  # ranked, whatever validation would find on 60 users
        ],
    )
    assert result.exit_code == 0, result.output
    bundle = ModelBundle.load(out)
    assert bundle.two_tower.config.user_id_dropout == 0.3
    assert isinstance(bundle.ranker, DCNv2)
    assert bundle.ranker.fields.codes.weight.shape[1] == 3 and bundle.ranker_variant == "factorised"
    ranker_manifest = json.loads((resolve_version(out) / "manifest.json").read_text())["models"][
        "ranker"
    ]
    assert (
        ranker_manifest["type"] == "dcn_v2" and ranker_manifest["variants"] == {}
    )  # factorised: no compressed copies
    user = int(bundle.features.users.ids[0])
    answer = RecommendPipeline(bundle).recommend(RecommendRequest(user_id=user, k=5))
    assert (
        len(answer.items) == 5
        and answer.ranker.model == "dcn_v2"
        and answer.ranker.variant == "factorised"
    )
    info = {
        "version": bundle.version,
        "retrieval": "two_tower",
        "ranker": "dcn_v2",
        "ranker_variant": "factorised",
        "ranker_runtime": "numpy",
        **ranker_variant_figures(bundle.manifest, "factorised"),
    }
    assert info["ranker_val_auc"] == info["ranker_trained_val_auc"]  # it serves as trained
    assert REGISTRY.get_sample_value("recsys_model_info", info) == 1.0
    with pytest.raises(ValueError, match="no ranker variant 'output_features'.*'factorised'"):
        ModelBundle.load(out, ranker_variant="output_features")
    refused = CliRunner().invoke(
        app, ["train", "--dataset", "synthetic", "--out", str(out), "--ranker", "xgboost"]
    )
    assert refused.exit_code == 2 and "xgboost" in refused.output
