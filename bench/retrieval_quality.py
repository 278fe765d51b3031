"""Candidate generation quality: Recall@{50,100,200} and diversity of most-popular, the
two-tower single vector, kNN-Embed interests without smoothing (alpha = 0), kNN-Embed at
its built-in knobs and at the knobs validation chooses, and the `implicit` library's ALS
(64 factors) as the peer, on one split.

    python bench/retrieval_quality.py [--quick] [--json PATH] [--dataset synthetic|movielens-100k:PATH]
                                      [--user-tower mean|sequence] [--protocol temporal|leave-last-out]

Trains one artifact on the training part (temporal: each user's first 80% of interactions;
leave-last-out: all but each user's latest; default configuration with the given user
tower, seed 0) and asks every strategy for each user's top-K, K in {50, 100, 200}, with the
user's training items left out. kNN-Embed's validated knobs are what `recsys train` would
choose on this training part (`service.evaluation.choose_knn_embed`: a model trained on it
but each user's latest interaction, judged on those). ALS needs the bench extra
(`pip install -e .[bench]`); without it its row is skipped with a note.
"""

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_config, bench_dataset, quality_parser
from service.data.split import leave_last_out, temporal_split
from service.evaluation import (
    VALIDATION_USERS,
    RetrievalEvaluator,
    choose_knn_embed,
    format_retrieval_table,
    pipeline_retrievers,
)
from service.pipeline.in_process import RecommendPipeline
from service.retrieval.knn_embed import MixtureKnobs
from service.retrieval.two_tower import USER_TOWERS
from service.training.artifact import TrainConfig, train


def als_retriever(train_part, factors: int = 64, seed: int = 0):
    """ALS on the binary user-item matrix of the training split: the usual strong baseline."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    users, user_index = np.unique(
        train_part.interactions["user_id"].to_numpy(np.uint64), return_inverse=True
    )
    items, item_index = np.unique(
        train_part.interactions["item_id"].to_numpy(np.uint64), return_inverse=True
    )
    matrix = sp.csr_matrix(
        (np.ones(len(user_index), np.float32), (user_index, item_index)),
        shape=(len(users), len(items)),
    )
    matrix.data[:] = 1.0  # repeated pairs count once
    model = AlternatingLeastSquares(
        factors=factors, iterations=15, regularization=0.05, random_state=seed
    )
    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, not BLAS's
        model.fit(matrix, show_progress=True)

    def retrieve(user_id: int, k: int) -> list[int]:
        row = int(np.searchsorted(users, np.uint64(user_id)))
        found, _ = model.recommend(row, matrix[row], N=k, filter_already_liked_items=True)
        return items[found].tolist()

    return retrieve


def main() -> None:
    parser = quality_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--user-tower", choices=USER_TOWERS, default="mean")
    parser.add_argument("--protocol", choices=("temporal", "leave-last-out"), default="temporal")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    dataset = bench_dataset(args)
    if args.protocol == "leave-last-out":
        train_part, test = leave_last_out(dataset)
    else:
        train_part, test = temporal_split(dataset, 0.2)
    config = TrainConfig()
    config = replace(config, two_tower=replace(config.two_tower, user_tower=args.user_tower))
    config = bench_config(args.quick, config)
    started = time.perf_counter()
    bundle, _ = train(train_part, config)
    bundle.manifest = {"models": {"knn_embed": {}}}
    train_seconds = time.perf_counter() - started
    fit_part, held_out = leave_last_out(train_part)
    if len(held_out) > VALIDATION_USERS:
        held_out = held_out.sample(VALIDATION_USERS, random_state=0).sort_values("user_id")
    validation_bundle, _ = train(fit_part, config, ranker=False)
    validation = choose_knn_embed(validation_bundle, held_out, item_to_item_share=0.0)
    knobs = MixtureKnobs()
    validated = replace(knobs, **validation["choice"])
    strategies = pipeline_retrievers(RecommendPipeline(bundle), knobs, validated)
    notes = []
    try:
        strategies["als_implicit"] = als_retriever(train_part)
    except ImportError:
        notes.append("ALS skipped: `implicit` is not installed (pip install -e .[bench])")
    results = RetrievalEvaluator(bundle, test).evaluate(strategies)
    results.update(
        dataset=dataset.name,
        user_tower=args.user_tower,
        protocol=args.protocol,
        knobs=knobs.__dict__,
        validation=validation,
        knn_embed=config.knn_embed.__dict__,
        train_seconds=round(train_seconds, 1),
        notes=notes,
    )
    print(format_retrieval_table(results))
    print(
        f"validated kNN-Embed knobs: alpha {validated.alpha}, reserved share "
        f"{validated.reserved_share} (m {validated.components})"
    )
    for note in notes:
        print(note)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
