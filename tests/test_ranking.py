import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.embedded import build_app
from service.artifacts import ranker_variant_serves
from service.bundle import ModelBundle, RankingParts
from service.data.context import context_rows
from service.pipeline.in_process import RankingStage
from service.ranking.dcn_v2 import DCNv2, DCNv2Config
from service.ranking.deepfm import DeepFM, DeepFMConfig
from service.ranking.ranker import Ranker
from service.schemas import Context
from service.settings import Settings

MODELS = {
    "deepfm": lambda: DeepFM(
        DeepFMConfig(field_sizes=(5, 5), attribute_size=3, numeric_fields=1, dim=8, hidden=(16,))
    ),
    "deepfm-factorised": lambda: DeepFM(
        DeepFMConfig(
            field_sizes=(5, 5), attribute_size=3, numeric_fields=1, dim=8, hidden=(16,), rank=3
        )
    ),
    "dcn-v2": lambda: DCNv2(
        DCNv2Config(field_sizes=(5, 5), attribute_size=3, numeric_fields=1, dim=8, hidden=(16,))
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_ctr_models_learn_an_interaction(name):
    """A label that depends only on the pair (field 0, field 1) needs the FM/cross/deep terms."""
    torch.manual_seed(0)
    model = MODELS[name]()
    a = torch.randint(1, 5, (4096,))
    b = torch.randint(1, 5, (4096,))
    labels = ((a + b) % 2 == 0).float()
    categorical = torch.stack([a, b], 1)
    attributes = torch.zeros(4096, 2, dtype=torch.long)
    numeric = torch.zeros(4096, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(categorical, attributes, numeric), labels
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    accuracy = ((model(categorical, attributes, numeric) > 0).float() == labels).float().mean()
    assert accuracy > 0.95


def test_factorised_tables_hold_rank_r_codes():
    full = DeepFM(DeepFMConfig(field_sizes=(1000, 500), attribute_size=3, numeric_fields=1, dim=16))
    factorised = DeepFM(
        DeepFMConfig(field_sizes=(1000, 500), attribute_size=3, numeric_fields=1, dim=16, rank=4)
    )
    assert factorised.fields.codes.weight.shape == (1500, 4)
    assert factorised.fields.up.shape == (2, 4, 16)
    table = sum(
        p.numel() for n, p in factorised.fields.named_parameters() if n in ("codes.weight", "up")
    )
    assert table == 1500 * 4 + 2 * 4 * 16 < full.fields.embedding.weight.numel() / 3


def test_context_rows_from_epoch_seconds():
    # 2024-01-01 was a Monday; 13:30 UTC
    hour, weekday = context_rows(np.array([1704115800]))
    assert (hour[0] - 1, weekday[0] - 1) == (13, 0)


def test_ranker_takes_unknown_ids_and_missing_context(bundle):
    ranker = Ranker(bundle.ranker, bundle.features, 1.0 / bundle.two_tower.config.temperature)
    items = bundle.features.items.ids[:5]
    known = ranker.score(int(bundle.features.users.ids[0]), items, np.zeros(5, np.float32), 3, 2)
    unknown = ranker.score(2**64 - 1, np.array([1, 2], dtype=np.uint64), np.zeros(2, np.float32))
    assert known.shape == (5,) and unknown.shape == (2,)
    assert ((known > 0) & (known < 1)).all() and ((unknown > 0) & (unknown < 1)).all()
    assert ranker.score(1, np.empty(0, np.uint64), np.empty(0, np.float32)).shape == (0,)


def test_a_ranker_built_with_fewer_numeric_fields_reads_only_those(bundle):
    """An artifact trained before the candidate's place was a field still serves."""
    config = bundle.ranker.config
    older = DeepFM(DeepFMConfig(config.field_sizes, config.attribute_size, 2, config.dim))
    ranker = Ranker(older, bundle.features, 1.0 / bundle.two_tower.config.temperature)
    items = bundle.features.items.ids[:3]
    assert ranker.encoder.encode_request(1, items, np.zeros(3), None, None).numeric.shape == (3, 2)
    assert ranker.score(1, items, np.zeros(3, np.float32)).shape == (3,)


def test_ranker_beats_chance_and_is_calibrated_on_validation(bundle):
    metrics = bundle.manifest["metrics"]["ranker"]
    assert metrics["val_auc"] > 0.6
    assert abs(metrics["val_mean_prediction"] - metrics["val_click_rate"]) < 0.1


@pytest.mark.parametrize("variant", ["output_features", "weight_svd"])
def test_compressed_ranker_variants_are_saved_measured_and_served_by_setting(
    artifact_root, bundle, known_user, variant
):
    stored = bundle.manifest["models"]["ranker"]["variants"][variant]
    assert stored["file"] in bundle.manifest["files"]  # hashed and verified like every file
    measured = bundle.manifest["metrics"]["ranker"]["variants"][variant]
    assert measured["ratio"] > 2
    assert measured["bytes"]["total"] < bundle.manifest["metrics"]["ranker"]["bytes"]["total"] / 2
    assert abs(measured["val_auc"] - bundle.manifest["metrics"]["ranker"]["val_auc"]) < 0.05

    compact = ModelBundle.load(artifact_root, ranker_variant=variant)
    assert compact.ranker_variant == variant
    assert compact.ranker.fields.codes.weight.shape[1] == stored["embedding_rank"]
    scale = 1.0 / bundle.two_tower.config.temperature
    items = bundle.features.items.ids[:100]
    retrieval = np.random.default_rng(0).normal(0.3, 0.1, 100).astype(np.float32)
    full_scores = Ranker(bundle.ranker, bundle.features, scale).score(
        known_user, items, retrieval, 3, 2
    )
    compact_scores = Ranker(compact.ranker, bundle.features, scale).score(
        known_user, items, retrieval, 3, 2
    )
    assert not np.array_equal(full_scores, compact_scores)
    assert np.corrcoef(full_scores, compact_scores)[0, 1] > 0.9

    settings = Settings(artifacts=artifact_root, grpc_port=0, ranker_variant=variant)
    with TestClient(build_app(settings)) as client:
        body = client.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
        assert body["ranker"] == {"model": "deepfm", "variant": variant}
        assert f'ranker_variant="{variant}"' in client.get("/metrics").text


def ranker_figures(trained_auc: float, variants: dict[str, tuple[float, int]]) -> dict:
    return {
        "metrics": {
            "ranker": {
                "val_auc": trained_auc,
                "bytes": {"total": 1000},
                "variants": {
                    name: {"val_auc": auc, "bytes": {"total": size}}
                    for name, (auc, size) in variants.items()
                },
            }
        }
    }


def test_auto_serves_the_smallest_compressed_copy_that_loses_no_validation_auc():
    both_hold = ranker_figures(0.80, {"output_features": (0.7995, 300), "weight_svd": (0.80, 250)})
    assert ranker_variant_serves(both_hold) == "weight_svd"  # the smaller of the two
    one_holds = ranker_figures(
        0.80, {"output_features": (0.7991, 300), "weight_svd": (0.7989, 250)}
    )
    assert ranker_variant_serves(one_holds) == "output_features"
    none_hold = ranker_figures(0.80, {"output_features": (0.798, 300), "weight_svd": (0.79, 250)})
    assert ranker_variant_serves(none_hold) is None
    assert ranker_variant_serves({"metrics": {"ranker": {"training": "none"}}}) is None
    # A setting that names a copy wins over the figures.
    assert ranker_variant_serves(none_hold, "weight_svd") == "weight_svd"
    assert ranker_variant_serves(both_hold, "trained") is None


def test_the_default_setting_serves_the_variant_validation_allows_and_says_why(
    artifact_root, bundle, known_user
):
    chosen = ranker_variant_serves(bundle.manifest)
    settings = Settings(artifacts=artifact_root, grpc_port=0, ranker="on")
    assert settings.ranker_variant == "auto"
    with TestClient(build_app(settings)) as client:
        body = client.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
        metrics = client.get("/metrics").text
    served = chosen or "full"
    assert body["ranker"] == {"model": "deepfm", "variant": served}
    measured = bundle.manifest["metrics"]["ranker"]
    figures = measured["variants"].get(served, measured)
    assert f'ranker_variant="{served}"' in metrics
    assert f'ranker_val_auc="{figures["val_auc"]:.4f}"' in metrics
    assert f'ranker_trained_val_auc="{measured["val_auc"]:.4f}"' in metrics
    assert f'ranker_bytes="{figures["bytes"]["total"]}"' in metrics
    trained = Settings(artifacts=artifact_root, grpc_port=0, ranker_variant="trained")
    assert ModelBundle.load(
        artifact_root, ranker_variant=trained.ranker_variant
    ).ranker_variant == ("full")


def test_an_unknown_ranker_variant_is_refused_at_startup(artifact_root):
    with pytest.raises(ValidationError, match="ranker_variant"):
        Settings(artifacts=artifact_root, ranker_variant="int8")


@pytest.mark.parametrize("variant", [None, "output_features"])
def test_the_ranking_tier_loads_only_the_ranking_parts_and_scores_alike(
    artifact_root, known_user, variant
):
    bundle = ModelBundle.load(artifact_root, ranker_variant=variant)
    parts = RankingParts.load(artifact_root, variant)
    assert parts.version == bundle.version and parts.ranker_variant == bundle.ranker_variant
    items = bundle.features.items.ids[:64]
    retrieval_scores = np.linspace(0.9, 0.1, len(items), dtype=np.float32)
    context = Context(hour=20, weekday=5)
    alone, in_bundle = RankingStage(parts), RankingStage(bundle.ranking_parts)
    np.testing.assert_array_equal(
        alone.rank(known_user, items, retrieval_scores, context),
        in_bundle.rank(known_user, items, retrieval_scores, context),
    )
    assert alone.ranker_info == in_bundle.ranker_info
