"""Similar items ("more like this"), evaluated offline: given a user's last item, is the
next one among its 10 most similar items?

Leave-last-out: train on every user's history but the last interaction; for each user,
the query is their last training item and the target the held-out one, ranked over the
whole catalogue. Side by side, in one run:
- `similar_items`: what `POST /v1/similar-items` answers (the item tower's vectors,
  cosine, through the served pipeline);
- `co_occurrence`: the artifact's item-to-item neighbours (cosine-normalised
  co-occurrence, item-kNN), the baseline of the issue trackers;
- `most_popular`: the training set's most popular items.

    python bench/similar_items.py [--quick] [--json PATH] [--dataset synthetic|movielens-100k:PATH]
"""

import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_config, bench_dataset, quality_parser
from service.bundle import ModelBundle
from service.data.split import leave_last_out
from service.pipeline.in_process import RecommendPipeline
from service.schemas import SimilarItemsRequest
from service.training.artifact import train_and_save

K = (10, 20)


def hit_rates(places: np.ndarray) -> dict:
    return {f"hr@{k}": round(float((places < k).mean()), 4) for k in K}


def main() -> None:
    parser = quality_parser(__doc__)
    args = parser.parse_args()
    data = bench_dataset(args)
    train_part, held_out = leave_last_out(data)
    with tempfile.TemporaryDirectory() as scratch:
        bundle = ModelBundle.load(train_and_save(train_part, scratch, bench_config(args.quick)))
        pipeline = RecommendPipeline(bundle)
        depth = max(K)
        places = {name: [] for name in ("similar_items", "co_occurrence", "most_popular")}
        popular = bundle.popular.top(depth + 1, np.empty(0, np.uint64)).item_ids
        for user, target in tqdm(
            zip(held_out["user_id"].tolist(), held_out["item_id"].tolist()),
            total=len(held_out),
            desc="queries",
            unit="user",
            mininterval=2,
        ):
            query = int(bundle.histories.get(user)[-1])
            answered = {
                "similar_items": [
                    i.item_id
                    for i in pipeline.similar_items(
                        SimilarItemsRequest(item_id=query, k=depth)
                    ).items
                ],
                "co_occurrence": bundle.neighbours.top(
                    np.array([query], np.uint64), depth, np.array([query], np.uint64)
                )[0].tolist(),
                "most_popular": [int(i) for i in popular if i != query][:depth],
            }
            for name, ids in answered.items():
                places[name].append(ids.index(target) if target in ids else depth)
    results = {
        "dataset": data.name,
        "machine": platform.platform(),
        "quick": args.quick,
        "queries": len(held_out),
        "methods": {name: hit_rates(np.array(p)) for name, p in places.items()},
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
