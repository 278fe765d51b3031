"""CTR data: the field map built from the training split, the Criteo reader, training
DeepFM / DCN-v2 on the Criteo rows, and their low-rank compression."""

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from service.ctr.field_map import EncodedRows, FieldMap
from service.ctr.training import CtrTrainConfig, predict, tensors, train_ctr
from service.data.criteo import (
    CATEGORICAL_COLUMNS,
    INTEGER_COLUMNS,
    load_criteo_splits,
    read_criteo,
)
from service.data.ctr import interactions_as_ctr
from service.data.schema import DataError
from service.ranking.compression import (
    CompressionConfig,
    CompressionPlan,
    compress,
    compress_fields,
    compress_linear_outputs,
    compressed_shape,
    layer_outputs,
    model_bytes,
    svd_linear,
    variance_rank,
)
from service.ranking.dcn_v2 import DCNv2, DCNv2Config
from service.ranking.deepfm import DeepFM, DeepFMConfig
from service.training.loop import binary_metrics

CRITEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo-kaggle-8k"


def small_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ad": ["a", "a", "b", "c", None],
            "count": [1.0, 10.0, np.nan, 1000.0, 3.0],
            "genres": ["Action|Comedy", "Comedy", "", "Drama|Action|War", None],
            "clicked": [1, 0, 0, 1, 0],
        }
    )


def test_field_map_keeps_frequent_values_and_defaults_the_rest():
    fields = FieldMap.build(
        small_frame(), ["ad"], ["count"], multi="genres", label="clicked", min_count=2, max_multi=2
    )
    assert fields.categorical[0].values == ["a"] and fields.field_sizes == (2,)
    assert fields.multi.values == ["Action", "Comedy"]  # seen twice each; Drama and War once
    unseen = pd.DataFrame(
        {
            "ad": ["a", "b", "zzz", None],
            "count": [1.0, np.nan, -5.0, 1e9],
            "genres": ["War|Comedy|Action", "", None, "Action"],
            "clicked": [0, 1, 0, 1],
        }
    )
    rows = fields.encode(unseen)
    assert rows.categorical[:, 0].tolist() == [1, 0, 0, 0]  # rare, unseen and missing: row 0
    assert rows.multi.tolist() == [[2, 1], [0, 0], [0, 0], [1, 0]]
    assert rows.numeric[1, 0] == 0.0  # missing: the training mean
    assert np.isfinite(rows.numeric).all() and rows.numeric[3, 0] > rows.numeric[0, 0]
    assert rows.labels.tolist() == [0, 1, 0, 1]
    again = FieldMap.from_json(fields.to_json()).encode(unseen)
    np.testing.assert_array_equal(again.categorical, rows.categorical)
    np.testing.assert_array_equal(again.numeric, rows.numeric)


def test_field_map_refuses_missing_columns():
    with pytest.raises(DataError, match="lacks column"):
        FieldMap.build(small_frame(), ["ad", "publisher"], [])


def test_criteo_reader_refuses_a_file_without_labels(tmp_path):
    bad = tmp_path / "rows.csv"
    bad.write_text("x\t1\n")
    with pytest.raises(DataError, match="0/1 label"):
        read_criteo(bad)
    with pytest.raises(DataError, match="criteo-kaggle-8k"):
        load_criteo_splits(tmp_path)


@pytest.mark.skipif(not CRITEO.is_dir(), reason=f"Criteo rows not found at {CRITEO}")
@pytest.mark.parametrize("model_name", ["deepfm", "dcn-v2"])
def test_ctr_models_learn_criteo(model_name):
    splits = load_criteo_splits(CRITEO)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [7200, 409, 391]
    fields = FieldMap.build(
        splits["train"],
        list(CATEGORICAL_COLUMNS),
        list(INTEGER_COLUMNS),
        label="label",
        min_count=3,
    )
    train, dev, test = (fields.encode(splits[s]) for s in ("train", "dev", "test"))
    args = (fields.field_sizes, fields.multi_size, len(fields.numeric))
    model = DeepFM(DeepFMConfig(*args)) if model_name == "deepfm" else DCNv2(DCNv2Config(*args))
    metrics = train_ctr(model, train, dev, CtrTrainConfig(epochs=4, patience=1))
    assert metrics["best"]["auc"] == max(e["auc"] for e in metrics["epochs"])
    predicted = predict(model, test)
    assert binary_metrics(test.labels, predicted)["auc"] > 0.65  # the click rate alone gives 0.5
    assert abs(predicted.mean() - test.labels.mean()) < 0.05  # started calibrated, stays near it


def test_output_feature_compression_keeps_what_the_outputs_use_and_svd_does_not():
    """Inputs in a 3-dim subspace make a full-rank layer's outputs rank 3: compressing the
    outputs to rank 3 is exact on such inputs, compressing the weights to rank 3 is not."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 24)
    inputs = torch.randn(2000, 3) @ torch.randn(3, 32)
    outputs = layer(inputs).detach()
    by_outputs = compress_linear_outputs(layer, outputs, 3)
    by_weights = svd_linear(layer, 3)
    with torch.no_grad():
        assert float((by_outputs(inputs) - outputs).norm() / outputs.norm()) < 1e-4
        assert float((by_weights(inputs) - outputs).norm() / outputs.norm()) > 0.1
        everything = compress_linear_outputs(
            layer, outputs, 24
        )  # all output directions: exact anywhere
        anywhere = torch.randn(100, 32)
        torch.testing.assert_close(everything(anywhere), layer(anywhere), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in by_weights.parameters()) == 32 * 3 + 3 * 24 + 24


def random_rows(n: int, field_sizes: tuple[int, int]) -> EncodedRows:
    """Two uniform categorical fields, two normal numeric ones, 30% positives."""
    rng = np.random.default_rng(0)
    return EncodedRows(
        np.stack([rng.integers(0, size, n) for size in field_sizes], 1),
        np.zeros((n, 1), np.int64),
        rng.normal(size=(n, 2)).astype(np.float32),
        (rng.random(n) < 0.3).astype(np.float32),
    )


@pytest.mark.parametrize(
    "model_class, config_class", [(DeepFM, DeepFMConfig), (DCNv2, DCNv2Config)]
)
def test_compressed_models_shrink_and_full_rank_changes_nothing(model_class, config_class):
    torch.manual_seed(0)
    rows = random_rows(3000, (400, 300))
    model = model_class(
        config_class(
            field_sizes=(400, 300), attribute_size=1, numeric_fields=2, dim=16, hidden=(64, 32)
        )
    )
    with torch.no_grad():  # a spread of weights like a trained model's
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    before = predict(model, rows)
    _, looked_up = layer_outputs(model, [], tensors(rows))
    for method in ("output_features", "weight_svd"):
        exact = copy.deepcopy(model)
        exact.fields = compress_fields(
            model.fields, method, 16, looked_up
        )  # rank d: a change of basis
        np.testing.assert_allclose(predict(exact, rows), before, atol=1e-5)
        small, plan = compress(
            model, method, CompressionConfig(embedding_rank=4, dense_keep=0.3), tensors(rows)
        )
        assert small.fields.codes.weight.shape == (700, 4)
        assert model_bytes(model)["total"] / model_bytes(small)["total"] > 2.5
        assert model_bytes(small)["embeddings"] == 700 * 4 * 4
        assert np.corrcoef(predict(small, rows), before)[0, 1] > 0.5
        # The plan alone rebuilds the compressed shape: its weights load and predict the same.
        rebuilt = compressed_shape(
            model_class(model.config), CompressionPlan.from_json(plan.to_json())
        )
        rebuilt.load_state_dict(small.state_dict())
        np.testing.assert_array_equal(predict(rebuilt.eval(), rows), predict(small, rows))
        assert (
            plan.embedding_rank == 4
            and plan.layers
            and set(plan.layers) <= {"mlp.0", "mlp.3", "cross.0.linear", "cross.1.linear"}
        )


def test_ranks_by_explained_variance_follow_the_spectrum():
    assert variance_rank(torch.tensor([6.0, 3.0, 1.0, 0.0]), 0.85) == 2
    assert variance_rank(torch.tensor([6.0, 3.0, 1.0, 0.0]), 0.95) == 3
    torch.manual_seed(0)
    rows = random_rows(2000, (50, 40))
    model = DeepFM(
        DeepFMConfig(
            field_sizes=(50, 40), attribute_size=1, numeric_fields=2, dim=16, hidden=(64, 32)
        )
    )
    with torch.no_grad():  # tables of rank 3: three components hold all of every field's variance
        model.fields.embedding.weight.copy_(torch.randn(90, 3) @ torch.randn(3, 16))
    small, plan = compress(
        model, "output_features", CompressionConfig(explained_variance=0.999), tensors(rows)
    )
    assert plan.embedding_rank == 3
    np.testing.assert_allclose(predict(small, rows), predict(model, rows), atol=2e-3)
    with pytest.raises(ValueError, match="explained_variance"):
        CompressionConfig(explained_variance=1.5)


def test_interactions_become_a_temporal_ctr_table_with_unseen_negatives(tiny_dataset):
    table = interactions_as_ctr(tiny_dataset, negatives=3, seed=1)
    n = len(tiny_dataset.interactions)
    assert len(table) == 4 * n and table["label"].sum() == n
    seen = set(
        zip(
            tiny_dataset.interactions["user_id"].astype(str),
            tiny_dataset.interactions["item_id"].astype(str),
        )
    )
    negatives = table[table["label"] == 0]
    assert not seen & set(zip(negatives["user_id"], negatives["item_id"]))
    positives = table[table["label"] == 1].merge(
        tiny_dataset.interactions.astype({"user_id": str, "item_id": str}),
        on=["user_id", "item_id"],
    )
    latest_train = positives.loc[positives["split"] == "train", "timestamp"].max()
    assert (positives.loc[positives["split"] == "test", "timestamp"] >= latest_train).all()
    assert table["split"].value_counts(normalize=True).round(1).to_dict() == {
        "train": 0.8,
        "dev": 0.1,
        "test": 0.1,
    }
    assert set(tiny_dataset.attribute_columns) <= set(table.columns)


def test_ctr_train_command_writes_a_model_that_loads_and_scores_as_measured(tmp_path):
    from typer.testing import CliRunner

    from service.artifacts import ArtifactError
    from service.cli import app
    from service.ctr.model import load_ctr_model
    from service.ctr.tables import load_ctr_table

    spec, out = "synthetic:users=120,items=150,seed=2", tmp_path / "ctr"
    result = CliRunner().invoke(
        app,
        [
            "ctr",
            "train",
            "--dataset",
            spec,
            "--out",
            str(out),
            "--model",
            "dcn_v2",
            "--compress",
            "weight_svd",
            "--embedding-rank",
            "3",
            "--epochs",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = load_ctr_model(out)
    manifest = saved.manifest
    assert (
        manifest["model"]["type"] == "dcn_v2"
        and manifest["model"]["compression"]["embedding_rank"] == 3
    )
    assert saved.model.fields.codes.weight.shape[1] == 3
    assert manifest["bytes"]["total"] < manifest["metrics"]["trained"]["bytes"]["total"] / 2
    assert set(manifest["files"]) == {"model.safetensors", "field_map.json"}
    # The loaded weights and field map reproduce the recorded test metrics exactly.
    _, splits = load_ctr_table(spec)
    test = saved.fields.encode(splits["test"])
    assert binary_metrics(test.labels, predict(saved.model, test)) == pytest.approx(
        manifest["metrics"]["test"], abs=1e-6
    )
    assert "test AUC" in result.output

    (saved.folder / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="sha256 of model.safetensors"):
        load_ctr_model(out)

    def refusal(*args: str) -> str:
        result = CliRunner().invoke(app, ["ctr", "train", *args])
        assert result.exit_code == 2
        return " ".join(result.output.replace("│", " ").split())  # the error box wraps lines

    assert "low-rank already" in refusal(
        "--dataset", spec, "--rank", "4", "--compress", "output_features"
    )
    assert "criteo-kaggle-8k" in refusal("--dataset", f"criteo:{tmp_path / 'nowhere'}")
