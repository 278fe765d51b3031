"""Offline evaluation on a temporal split: Recall@K of the full pipeline, of candidate
generation alone, and of a most-popular baseline, all through the serving code."""

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from service.bundle import ModelBundle
from service.pipeline import RecommendPipeline
from service.schemas import RecommendRequest

CUTOFFS = (10, 50, 100)


def recall_at(ranked: list[int], relevant: set[int], cutoffs=CUTOFFS) -> dict[int, float]:
    """Share of the relevant items found in the first K of `ranked`, for each K."""
    hits = np.cumsum([item in relevant for item in ranked]) if ranked else np.zeros(0)
    return {k: (float(hits[min(k, len(hits)) - 1]) if len(hits) else 0.0) / len(relevant) for k in cutoffs}


def evaluate_pipeline(pipeline: RecommendPipeline, test: pd.DataFrame, candidates: int = 200, cutoffs=CUTOFFS) -> dict:
    depth = max(cutoffs)
    relevant = test.groupby("user_id")["item_id"].agg(lambda s: set(int(i) for i in s))
    popular = [int(i) for i in pipeline.bundle.popular_items]
    sums = {name: dict.fromkeys(cutoffs, 0.0) for name in ("pipeline", "candidate_generation", "most_popular")}
    for user_id, truth in tqdm(relevant.items(), total=len(relevant), desc="eval", unit="user", mininterval=2):
        request = RecommendRequest(user_id=int(user_id), k=depth, candidates=max(candidates, depth))
        ranked = [item.item_id for item in pipeline.recommend(request).items]
        retrieved = [c.item_id for c in pipeline.candidates(request.model_copy(update={"candidates": depth})).candidates]
        seen = set(pipeline.bundle.histories.get(int(user_id)).tolist())
        most_popular = [i for i in popular if i not in seen][:depth]
        for name, ranking in (("pipeline", ranked), ("candidate_generation", retrieved), ("most_popular", most_popular)):
            for k, value in recall_at(ranking, truth, cutoffs).items():
                sums[name][k] += value
    users = len(relevant)
    return {
        "users": users,
        "candidates": candidates,
        "recall": {name: {f"@{k}": round(v / users, 4) for k, v in by_k.items()} for name, by_k in sums.items()},
    }


def evaluate_artifact(folder: str | Path, test: pd.DataFrame) -> dict:
    bundle = ModelBundle.load(folder)
    results = evaluate_pipeline(RecommendPipeline(bundle), test)
    results["model_version"] = bundle.version
    results["ranker_val_auc"] = bundle.manifest["metrics"]["ranker"]["val_auc"]
    results["train_seconds"] = bundle.manifest["metrics"]["train_seconds"]
    return results


def format_table(results: dict) -> str:
    recall = results["recall"]
    cutoffs = list(next(iter(recall.values())))
    lines = [f"Recall on {results['users']} users (temporal split)", "| | " + " | ".join(f"Recall{c}" for c in cutoffs) + " |"]
    lines.append("|---|" + "---|" * len(cutoffs))
    for name, by_k in recall.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_k[c]:.4f}" for c in cutoffs) + " |")
    base, full = recall["most_popular"]["@50"], recall["pipeline"]["@50"]
    if base > 0:
        lines.append(f"pipeline vs most_popular at Recall@50: {full / base - 1:+.1%}")
    return "\n".join(lines)
