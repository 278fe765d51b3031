"""The sequence user tower end to end: trained, saved and loaded as an artifact, served by
the candidate generator with the vector the torch model computes, and moved by the order
of the user's items and by every new click without any training."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from service.artifacts import resolve_version
from service.bundle import ModelBundle
from service.cli import app
from service.embeddings.recent_items import InMemoryRecentItems
from service.embeddings.store import Lookup
from service.online.interests import padded_histories
from service.pipeline.in_process import RecommendPipeline
from service.schemas import RecommendRequest
from service.training.artifact import train_and_save
from tests.conftest import tiny_train_config


@pytest.fixture(scope="module")
def sequence_bundle(tmp_path_factory, tiny_dataset) -> ModelBundle:
    config = tiny_train_config()
    config = replace(
        config,
        two_tower=replace(config.two_tower, user_tower="sequence", sequence_epochs=2),
    )
    root = tmp_path_factory.mktemp("sequence")
    train_and_save(tiny_dataset, str(root), config)
    return ModelBundle.load(root)


def torch_user_vector(bundle: ModelBundle, user_id: int, items: np.ndarray) -> np.ndarray:
    """The reference: the model's own forward pass from its tables."""
    features, length = bundle.features, bundle.two_tower.config.history_length
    rows = np.zeros((1, length), np.int64)
    latest = features.items.rows(items[-length:])
    rows[0, length - len(latest) :] = latest
    with torch.inference_mode():
        return bundle.two_tower.user_from_rows(
            torch.from_numpy(features.users.rows(np.array([user_id], np.uint64))),
            torch.from_numpy(rows),
        ).numpy()


def test_the_artifact_serves_the_vector_the_model_computes(sequence_bundle, bundle):
    assert sequence_bundle.two_tower.config.user_tower == "sequence"
    assert bundle.two_tower.config.user_tower == "mean"  # the configuration's default
    pipeline = RecommendPipeline(sequence_bundle)
    user_id = int(sequence_bundle.features.users.ids[3])
    history = sequence_bundle.histories.get(user_id)
    served, degraded = pipeline.generator.user_vector(user_id, history)
    assert not degraded
    np.testing.assert_allclose(
        served, torch_user_vector(sequence_bundle, user_id, history), atol=1e-5
    )
    answer = pipeline.recommend(RecommendRequest(user_id=user_id, k=10))
    assert len(answer.items) == 10
    assert not {item.item_id for item in answer.items} & set(history.tolist())


def test_the_vector_follows_order_and_clicks(sequence_bundle, bundle):
    """Order matters to the sequence tower only; a click moves either tower's vector at
    once, through the recent items."""
    user_id = int(sequence_bundle.features.users.ids[5])
    history = sequence_bundle.histories.get(user_id)
    reordered = history[::-1].copy()
    for model_bundle, order_matters in ((sequence_bundle, True), (bundle, False)):
        generator = RecommendPipeline(model_bundle).generator
        as_trained = generator.user_vector(user_id, history)[0]
        shuffled = generator.user_vector(user_id, reordered)[0]
        assert (np.abs(as_trained - shuffled).max() > 1e-4) == order_matters

    recent = InMemoryRecentItems(50, 3600)
    pipeline = RecommendPipeline(sequence_bundle, recent=recent)
    before = pipeline.generator.user_vector(user_id, pipeline.generator.history(user_id)[0])[0]
    clicked = np.setdiff1d(sequence_bundle.features.items.ids, history)[:1]
    recent.push(np.array([user_id], np.uint64), clicked)
    now, _ = pipeline.generator.history(user_id)
    assert now[-1] == clicked[0]
    after = pipeline.generator.user_vector(user_id, now)[0]
    assert np.abs(after - before).max() > 1e-4
    np.testing.assert_allclose(after, torch_user_vector(sequence_bundle, user_id, now), atol=1e-5)


def test_train_trains_the_tower_it_is_told_to(tmp_path):
    out = tmp_path / "artifacts"
    args = ["train", "--dataset", "synthetic:users=60,items=80,categories=3", "--out", str(out)]
    args += ["--two-tower-epochs", "1", "--ranker-epochs", "1", "--no-validate"]
    result = CliRunner().invoke(app, [*args, "--user-tower", "sequence"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((resolve_version(out) / "manifest.json").read_text())
    assert manifest["models"]["two_tower"]["user_tower"] == "sequence"
    assert manifest["models"]["two_tower"]["sequence_epochs"] == 1
    assert "validation" not in manifest
    refused = CliRunner().invoke(app, [*args, "--user-tower", "transformer"])
    assert refused.exit_code == 2 and "transformer" in refused.output


def test_histories_are_left_padded_in_order_for_the_tower():
    """Several users' looked-up rows, one after another, as the towers take them."""
    vectors = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    found = np.array([True, True, True, False, True])
    history, valid = padded_histories(Lookup(vectors, found), np.array([2, 0, 3]), 2)
    assert history.shape == (3, 3, 2) and valid.shape == (3, 3)
    np.testing.assert_array_equal(history[0, 1:], vectors[:2])  # the latest item last
    assert valid[0].tolist() == [False, True, True]
    assert not valid[1].any()
    np.testing.assert_array_equal(history[2], vectors[2:])
    assert valid[2].tolist() == [True, False, True]  # a row the table lacks stays masked
