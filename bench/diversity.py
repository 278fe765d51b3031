"""The diversity knob (MMR over item vectors) and max_per, against accuracy: what a product
team pays in hits for answers that spread over more categories.

Leave-last-out: train on every user's history but the last interaction, then ask the
served pipeline (`recommend`, ranker included where validation serves it) for each user's
top 10 under each setting, all in one run, on one artifact:
- hit rate and NDCG@10 of the held-out item;
- distinct values of the catalog's first attribute (categories, genres) in the top 10;
- intra-list distance: 1 - the mean cosine between the answer's item vectors.

    python bench/diversity.py [--quick] [--json PATH] [--dataset synthetic|movielens-100k:PATH]
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
from service.schemas import RecommendRequest
from service.training.artifact import train_and_save

K = 10
DIVERSITY = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)


def settings(attribute: str) -> list[tuple[str, dict | None]]:
    rows = [(f"diversity {d}", {"diversity": d} if d else None) for d in DIVERSITY]
    rows.append((f"max_per {attribute} 2", {"max_per": {"attribute": attribute, "count": 2}}))
    return rows


def main() -> None:
    parser = quality_parser(__doc__)
    args = parser.parse_args()
    data = bench_dataset(args)
    attribute = data.attribute_columns[0]
    train_part, held_out = leave_last_out(data)
    with tempfile.TemporaryDirectory() as scratch:
        bundle = ModelBundle.load(train_and_save(train_part, scratch, bench_config(args.quick)))
        pipeline = RecommendPipeline(bundle)
        catalog, index = pipeline.catalog, bundle.index
        users = list(zip(held_out["user_id"].tolist(), held_out["item_id"].tolist()))
        rows = {}
        for name, rules in settings(attribute):
            hits, gains, distinct, distance = [], [], [], []
            for user, target in tqdm(users, desc=name, unit="user", mininterval=2):
                request = RecommendRequest.model_validate({"user_id": user, "k": K, "rules": rules})
                ids = np.array([i.item_id for i in pipeline.recommend(request).items], np.uint64)
                place = np.flatnonzero(ids == np.uint64(target))
                hits.append(float(len(place) > 0))
                gains.append(1.0 / np.log2(place[0] + 2) if len(place) else 0.0)
                distinct.append(len(set().union(*catalog.values_of(ids, attribute))))
                vectors = index.vectors_of(ids)
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
                cosines = vectors @ vectors.T
                pairs = len(ids) * (len(ids) - 1)
                distance.append(1.0 - (cosines.sum() - np.trace(cosines)) / max(pairs, 1))
            rows[name] = {
                f"hr@{K}": round(float(np.mean(hits)), 4),
                f"ndcg@{K}": round(float(np.mean(gains)), 4),
                f"distinct_{attribute}": round(float(np.mean(distinct)), 2),
                "intra_list_distance": round(float(np.mean(distance)), 4),
            }
            print(name, rows[name], flush=True)
    results = {
        "dataset": data.name,
        "machine": platform.platform(),
        "quick": args.quick,
        "users": len(users),
        "attribute": attribute,
        "ranker_serves": pipeline.ranks,
        "rows": rows,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
