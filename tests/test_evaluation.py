import json

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.data.files import load_dataset
from service.data.split import temporal_split
from service.evaluation import recall_at
from tests.conftest import MOVIELENS


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
        app, ["eval", "--dataset", f"movielens-100k:{MOVIELENS}", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    recall = json.loads(out.read_text())["recall"]
    assert recall["pipeline"]["@50"] >= 1.2 * recall["most_popular"]["@50"]
