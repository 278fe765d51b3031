"""Session (anonymous) recommendations: how much of a known user's answer a logged-out
visitor gets back from the items of their session, against the user served by id and
against the popular items a visitor without items gets.

    python bench/session_recs.py [--quick] [--json PATH] [--dataset synthetic|movielens-100k:PATH]
                                 [--user-tower mean|sequence] [--user-id-dropout P]

Leave-last-out: each user's last interaction held out, one artifact trained on the rest
(default configuration with the given user tower and user-id dropout, seed 0, no
validation). For each user
the candidates are asked for, in retrieval order, in these ways: by the user's id (what a
logged-in user gets), and by an id the service does not know with the user's latest N
training items as `recent_item_ids` (N = 50, the history the tower reads; 10; 3; 1), and
with none (popular items). HR@{10,20} and NDCG@10 of the held-out item; the user's
training items are left out of every list, the session's by the service itself.
"""

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_config, bench_dataset, quality_parser
from service.data.split import leave_last_out
from service.evaluation import hit_and_ndcg
from service.pipeline.in_process import PipelineOptions, RecommendPipeline
from service.retrieval.two_tower import USER_TOWERS
from service.schemas import MAX_CANDIDATES, UINT64_MAX, RecommendRequest
from service.training.artifact import TrainConfig, train

SESSION_LENGTHS = (50, 10, 3, 1)
CUTOFFS = (10, 20)
VISITOR = UINT64_MAX - 1  # an id no data set here uses


def main() -> None:
    parser = quality_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--user-tower", choices=USER_TOWERS, default="mean")
    parser.add_argument(
        "--user-id-dropout",
        type=float,
        default=0.0,
        help="train with this share of user-id vectors dropped (recsys train --user-id-dropout)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dataset = bench_dataset(args)
    train_part, test = leave_last_out(dataset)
    config = TrainConfig()
    config = replace(
        config,
        two_tower=replace(
            config.two_tower, user_tower=args.user_tower, user_id_dropout=args.user_id_dropout
        ),
    )
    config = bench_config(args.quick, config)
    started = time.perf_counter()
    bundle, _ = train(train_part, config)
    train_seconds = time.perf_counter() - started
    pipeline = RecommendPipeline(bundle, options=PipelineOptions(ranker="off"))
    depth = max(CUTOFFS)
    sums: dict[str, dict[str, float]] = {}
    for user_id, target in tqdm(
        zip(test["user_id"].tolist(), test["item_id"].tolist()),
        total=len(test),
        desc="eval",
        unit="user",
        mininterval=2,
    ):
        history = bundle.histories.get(user_id)
        seen = set(history.tolist())
        # A visitor's list may hold the user's older training items, which every list here
        # leaves out: ask for that many more, drop them, keep the first `depth`.
        more = min(MAX_CANDIDATES, depth + len(history))
        asked = {"by id": RecommendRequest(user_id=user_id, k=depth, candidates=depth)}
        for n in SESSION_LENGTHS:
            asked[f"visitor, latest {n} items"] = RecommendRequest(
                user_id=VISITOR, k=depth, candidates=more, recent_item_ids=history[-n:].tolist()
            )
        asked["visitor, no items"] = RecommendRequest(user_id=VISITOR, k=depth, candidates=more)
        for name, request in asked.items():
            found = pipeline.candidates(request).candidates
            ranked = [c.item_id for c in found if c.item_id not in seen][:depth]
            row = sums.setdefault(name, {})
            for k, (hit, gain) in hit_and_ndcg(ranked, target, CUTOFFS).items():
                row[f"HR@{k}"] = row.get(f"HR@{k}", 0.0) + hit
                if k == CUTOFFS[0]:
                    row[f"NDCG@{k}"] = row.get(f"NDCG@{k}", 0.0) + gain
    users = len(test)
    rows = {name: {m: round(v / users, 4) for m, v in row.items()} for name, row in sums.items()}
    results = {
        "dataset": dataset.name,
        "user_tower": args.user_tower,
        "user_id_dropout": args.user_id_dropout,
        "users": users,
        "train_seconds": round(train_seconds, 1),
        "rows": rows,
    }
    metrics = list(rows["by id"])
    print(
        f"{dataset.name}, leave-last-out, {users} users, {args.user_tower} tower, "
        f"user-id dropout {args.user_id_dropout}"
    )
    print("| | " + " | ".join(metrics) + " | vs by id |")
    print("|---|" + "---:|" * (len(metrics) + 1))
    for name, row in rows.items():
        ratio = row["HR@10"] / rows["by id"]["HR@10"] if rows["by id"]["HR@10"] else float("nan")
        print(f"| {name} | " + " | ".join(f"{row[m]:.4f}" for m in metrics) + f" | {ratio:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
