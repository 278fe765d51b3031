import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from service.bundle import ModelBundle
from service.cli import app
from service.data.files import load_dataset
from service.data.schema import Dataset
from service.data.split import leave_last_out, temporal_split
from service.evaluation import (
    CHOICE_TOLERANCE,
    ITEM_TO_ITEM_SHARES,
    KNN_EMBED_KNOBS,
    MIN_RANKER_LISTS,
    evaluate_leave_last_out,
    hit_and_ndcg,
    pipeline_retrievers,
    recall_at,
    validate,
)
from service.pipeline.in_process import PipelineOptions, RecommendPipeline
from service.retrieval.knn_embed import MixtureKnobs
from service.training.artifact import TrainConfig, train, train_and_save
from tests.conftest import MOVIELENS, tiny_train_config


def test_recall_at_cutoffs():
    ranked = [1, 2, 3, 4, 5]
    assert recall_at(ranked, {2, 5, 9}, cutoffs=(1, 2, 5, 10)) == {
        1: 0.0,
        2: 1 / 3,
        5: 2 / 3,
        10: 2 / 3,
    }
    assert recall_at([], {1}, cutoffs=(10,)) == {10: 0.0}


def test_eval_command_writes_recall_for_pipeline_retrieval_and_baseline(tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--dataset",
            "synthetic:users=150,items=200,categories=6",
            "--two-tower-epochs",
            "2",
            "--ranker-epochs",
            "1",
            "--json",
            str(out),
            "--artifacts-out",
            str(tmp_path / "art"),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert set(results["recall"]) == {"pipeline", "candidate_generation", "most_popular"}
    for by_k in results["recall"].values():
        assert set(by_k) == {"@10", "@50", "@100"}
        assert by_k["@10"] <= by_k["@50"] <= by_k["@100"] <= 1.0
    _, held_out = temporal_split(load_dataset("synthetic:users=150,items=200,categories=6"), 0.2)
    assert results["users"] == held_out["user_id"].nunique()
    assert "Recall@50" in result.output


@pytest.mark.slow
@pytest.mark.skipif(
    not (MOVIELENS / "u.data").is_file(), reason="MovieLens-100K not present in ../shared/data"
)
def test_movielens_pipeline_beats_most_popular_by_a_fifth(tmp_path):
    out = tmp_path / "ml.json"
    result = CliRunner().invoke(
        app,
        # The tower validation picks on MovieLens (docs/evaluation.md), trained once: the
        # validation itself is held to its choices by the synthetic tests.
        ["eval", "--dataset", f"movielens-100k:{MOVIELENS}", "--user-tower", "sequence"]
        + ["--no-validate", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    recall = json.loads(out.read_text())["recall"]
    assert recall["pipeline"]["@50"] >= 1.2 * recall["most_popular"]["@50"]


def test_leave_last_out_holds_out_each_users_last_interaction():
    frame = pd.DataFrame(
        {
            "user_id": np.array([1, 1, 1, 2, 2, 3], np.uint64),
            "item_id": np.array([10, 12, 11, 20, 21, 30], np.uint64),
            "timestamp": np.array([5, 9, 9, 1, 2, 7], np.int64),  # user 1's last two are a tie
            "weight": np.ones(6, np.float32),
        }
    )
    items = pd.DataFrame({"item_id": np.array([10, 11, 12, 20, 21, 30], np.uint64)})
    train, test = leave_last_out(Dataset("toy", frame, items))
    assert test[["user_id", "item_id"]].to_numpy().tolist() == [[1, 12], [2, 21]]  # tie: larger id
    assert sorted(train.interactions["item_id"].tolist()) == [
        10,
        11,
        20,
        30,
    ]  # user 3 keeps its one


def test_hit_and_ndcg_of_one_held_out_item():
    assert hit_and_ndcg([5, 7, 9], 7, cutoffs=(1, 2, 3)) == {
        1: (0.0, 0.0),
        2: (1.0, 1 / np.log2(3)),
        3: (1.0, 1 / np.log2(3)),
    }
    assert hit_and_ndcg([5, 7, 9], 4, cutoffs=(10,)) == {10: (0.0, 0.0)}
    assert hit_and_ndcg([4], 4, cutoffs=(10,)) == {10: (1.0, 1.0)}


def test_eval_leave_last_out_reports_hr_and_ndcg_for_every_row(tmp_path):
    spec = "synthetic:users=150,items=200,categories=6"
    out = tmp_path / "llo.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--dataset",
            spec,
            "--protocol",
            "leave-last-out",
            "--two-tower-epochs",
            "2",
            "--ranker-epochs",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    rows = {
        "pipeline",
        "candidate_generation",
        "pipeline_knn_embed",
        "candidate_generation_knn_embed",
        "most_popular",
    }
    assert results["protocol"] == "leave-last-out"
    assert set(results["hit_rate"]) == set(results["ndcg"]) == rows
    for name in rows:
        hr, ndcg = results["hit_rate"][name], results["ndcg"][name]
        assert 0.0 <= ndcg["@10"] <= hr["@10"] <= hr["@20"] <= 1.0 and ndcg["@10"] <= ndcg["@20"]
    _, held_out = leave_last_out(load_dataset(spec))
    assert results["users"] == len(held_out) == held_out["user_id"].nunique()
    assert results["hit_rate"]["pipeline"]["@20"] > results["hit_rate"]["most_popular"]["@20"]
    assert "HR@10" in result.output and "NDCG@20" in result.output
    # The artifact went through validation, and the results say what it chose.
    assert isinstance(results["validation"]["choices"]["ranker"], bool)
    assert results["ranker_serves"] == results["validation"]["choices"]["ranker"]
    assert "validation HR@10" in result.output
    # Both user towers and every item-to-item share were validated, and what was kept
    # serves the best answers there.
    tried = results["validation"]["tried"]
    choices = results["validation"]["choices"]
    assert {(t["user_tower"], t["item_to_item_share"]) for t in tried} == {
        (tower, share) for tower in ("mean", "sequence") for share in ITEM_TO_ITEM_SHARES
    }
    best = max(t["retrieval_hit_rate"] for t in tried)
    kept = [
        t
        for t in tried
        if (t["user_tower"], t["item_to_item_share"])
        == (choices["user_tower"], choices["item_to_item_share"])
    ]
    # The first within the tolerance of the best, in the order tried (simpler first).
    assert kept[0]["retrieval_hit_rate"] >= best * (1 - CHOICE_TOLERANCE)
    assert all(
        t["retrieval_hit_rate"] < best * (1 - CHOICE_TOLERANCE)
        for t in tried[: tried.index(kept[0])]
    )
    # The ranker serves only if its cross-fitted figure beats retrieval order there.
    hits = results["validation"]["hit_rate"]
    assert hits["candidate_generation"]["@10"] == kept[0]["retrieval_hit_rate"]
    assert choices["ranker"] == (
        hits["pipeline"]["@10"] > hits["candidate_generation"]["@10"] * (1 + CHOICE_TOLERANCE)
    )
    assert results["ranker_training"].startswith("listwise")
    assert f"chosen on validation: {choices['user_tower']} user tower" in result.output
    # kNN-Embed's knobs: every pair was tried, and the kept one holds the single vector's
    # HR@100 with more clusters covered, the best HR of those; or, with none holding, the
    # whole budget goes to the single vector.
    knn_embed = results["validation"]["knn_embed"]
    assert [(t["alpha"], t["reserved_share"]) for t in knn_embed["tried"]] == list(KNN_EMBED_KNOBS)
    single = knn_embed["single_vector"]
    holding = [
        t
        for t in knn_embed["tried"]
        if t["hit_rate"] >= single["hit_rate"] and t["clusters"] > single["clusters"]
    ]
    chosen = choices["knn_embed"]
    if holding:
        best = next(t for t in holding if t["hit_rate"] == max(h["hit_rate"] for h in holding))
        assert chosen == {"alpha": best["alpha"], "reserved_share": best["reserved_share"]}
    else:
        assert chosen["reserved_share"] == 1.0
    assert f"kNN-Embed: alpha {chosen['alpha']:.2f}" in result.output


@pytest.mark.slow
def test_validated_choices_lift_the_held_out_answers_on_the_synthetic_set():
    """What validation picks on the training part (here: how much of the item-to-item
    source) must carry over to users it never saw: the synthetic set is co-occurrence
    through and through, so the served answers beat the vector search alone by a margin."""
    fit_part, held_out = leave_last_out(load_dataset("synthetic:users=800,items=900,categories=12"))
    config = TrainConfig()
    config = replace(config, ranker=replace(config.ranker, epochs=2))
    validation = validate(fit_part, config)
    choices = validation.figures["choices"]
    assert {t["item_to_item_share"] for t in validation.figures["tried"]} == set(
        ITEM_TO_ITEM_SHARES
    )
    bundle, _ = train(fit_part, config, validation.ranker_lists)
    bundle.manifest = {"models": {"knn_embed": {}}, "validation": validation.figures}

    def hit_rate(pipeline: RecommendPipeline, row: str) -> float:
        figures = evaluate_leave_last_out(pipeline, held_out, strategies=("two_tower",))
        return figures["hit_rate"][row]["@10"]

    served = hit_rate(RecommendPipeline(bundle), "pipeline")
    vector_only = RecommendPipeline(
        bundle, options=PipelineOptions(item_to_item_share=0.0, ranker="off")
    )
    assert choices["item_to_item_share"] > 0.0
    assert served >= 1.1 * hit_rate(vector_only, "candidate_generation")
    assert served >= 5 * hit_rate(vector_only, "most_popular")


def test_validation_with_too_few_lists_to_learn_from_keeps_the_ranker_off(tiny_dataset, tmp_path):
    validation = validate(
        tiny_dataset,
        tiny_train_config(),
        max_users=MIN_RANKER_LISTS - 1,
        item_to_item_shares=(0.0,),
    )
    assert validation.ranker_lists is None
    assert validation.figures["choices"]["ranker"] is False
    assert validation.figures["ranker"].startswith("not trained")
    assert (
        validation.figures["hit_rate"]["pipeline"]
        == validation.figures["hit_rate"]["candidate_generation"]
    )
    folder = train_and_save(tiny_dataset, str(tmp_path), tiny_train_config(), validation)
    bundle = ModelBundle.load(folder)
    assert bundle.manifest["metrics"]["ranker"]["training"].startswith("pointwise")
    assert RecommendPipeline(bundle).ranks is False


def test_no_retriever_of_the_benchmarks_recommends_a_seen_item(pipeline, bundle):
    retrievers = pipeline_retrievers(pipeline, MixtureKnobs())
    for user_id in bundle.features.users.ids[:20].tolist():
        seen = set(bundle.histories.get(user_id).tolist())
        for name, retrieve in retrievers.items():
            listed = retrieve(user_id, 50)
            assert len(listed) == 50 and not seen & set(listed), name
