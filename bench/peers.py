"""The pipeline against the peers a team would deploy instead, on the same splits and users,
in one run: most-popular, EASE (closed form), and the `implicit` library's ALS, next to the
pipeline's own rows (as served, retrieval order, each strategy) and its ablations.

    python bench/peers.py [--quick] [--json PATH] [--dataset synthetic|movielens-100k:PATH]
                          [--protocol temporal|leave-last-out]...

Both protocols by default: temporal (each user's latest 20% held out, Recall@{10,50,100})
and leave-last-out (each user's last interaction held out, the whole catalogue ranked, HR and
NDCG@{10,20}). Every list leaves out the user's training items. The pipeline is chosen as
`recsys train` chooses it (seed 0): validation on the training part picks the user tower,
the item-to-item share and whether the ranker serves (`--no-validate`: mean tower, ranked,
no item-to-item source); its rows are what it serves. Ablations beside them: each user
tower's vector search alone (`two_tower_mean`, `two_tower_sequence`), the item-to-item
source alone (`item_to_item`) and the ranker over the served candidates whatever
validation chose (`ranker_always_on`). Each peer gets a small tuning
budget, spent on a validation split of the training part (each user's last training
interaction held out; never the test part), picked by HR@20 there:

- EASE: L2 weight in {50, 200, 500, 1000, 3000} (Steck 2019: B = I - P / diag(P),
  P = (X'X + lambda I)^-1 on the binary user-item matrix);
- ALS: factors in {32, 64, 128}, regularisation 0.05, 15 iterations (needs the bench extra,
  `pip install -e .[bench]`; without it the row is skipped with a note).

- SASRec (rectools 0.19's `SASRecModel`, `bench/sasrec_peer.py`): the configuration its
  MovieLens-100K figure was published with (64 dims, 2 blocks, 2 heads, the latest 50
  items, dropout 0.2, 100 epochs), untuned. rectools requires numpy < 2, which the service
  does not run on, so it runs in its own interpreter (`--sasrec-python`, by default
  `.venv-sasrec/bin/python`, which `scripts/sasrec-env.sh` makes); without it the row is
  skipped with a note.
"""

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_config, bench_dataset, quality_parser
from service.data.schema import Dataset
from service.data.split import leave_last_out, temporal_split
from service.evaluation import (
    CUTOFFS,
    LEAVE_LAST_OUT_CUTOFFS,
    hit_and_ndcg,
    recall_at,
    served_lists,
    validate,
)
from service.pipeline.in_process import PipelineOptions, RecommendPipeline
from service.retrieval.two_tower import USER_TOWERS
from service.schemas import RecommendRequest
from service.training.artifact import TrainConfig, train

EASE_L2 = (50.0, 200.0, 500.0, 1000.0, 3000.0)
ALS_FACTORS = (32, 64, 128)
MAX_EASE_ITEMS = 20_000  # P is items x items, dense
ROOT = Path(__file__).resolve().parents[1]
SASREC_PYTHON = ROOT / ".venv-sasrec" / "bin" / "python"
PEERS = ("most_popular", "ease", "als_implicit", "sasrec")


class Interactions:
    """The binary user-item matrix of a training part, with its id maps."""

    def __init__(self, data: Dataset):
        frame = data.interactions
        self.users, user_index = np.unique(
            frame["user_id"].to_numpy(np.uint64), return_inverse=True
        )
        self.items, item_index = np.unique(
            frame["item_id"].to_numpy(np.uint64), return_inverse=True
        )
        ones = np.ones(len(user_index), np.float32)
        self.matrix = sp.csr_matrix(
            (ones, (user_index, item_index)), shape=(len(self.users), len(self.items))
        )
        self.matrix.data[:] = 1.0  # repeated pairs count once

    def row(self, user_id: int) -> int | None:
        at = int(np.searchsorted(self.users, np.uint64(user_id)))
        return at if at < len(self.users) and self.users[at] == user_id else None

    def top(self, scores: np.ndarray, row: int, k: int) -> list[int]:
        """The `k` best-scored items the user has no training interaction with."""
        scores = scores.astype(np.float64, copy=True)
        scores[self.matrix[row].indices] = -np.inf
        k = min(k, len(scores))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return self.items[best[np.isfinite(scores[best])]].tolist()


def ease(interactions: Interactions, l2: float):
    """EASE's item-item weights; a retriever of (user id, k) -> item ids."""
    gram = (interactions.matrix.T @ interactions.matrix).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)
    weights[np.diag_indices_from(weights)] = 0.0

    def retrieve(user_id: int, k: int) -> list[int]:
        row = interactions.row(user_id)
        if row is None:
            return []
        scores = interactions.matrix[row] @ weights
        return interactions.top(np.asarray(scores).ravel(), row, k)

    return retrieve


def als(interactions: Interactions, factors: int, seed: int = 0):
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    model = AlternatingLeastSquares(
        factors=factors, iterations=15, regularization=0.05, random_state=seed
    )
    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, not BLAS's
        model.fit(interactions.matrix, show_progress=False)

    def retrieve(user_id: int, k: int) -> list[int]:
        row = interactions.row(user_id)
        if row is None:
            return []
        found, _ = model.recommend(
            row, interactions.matrix[row], N=k, filter_already_liked_items=True
        )
        return interactions.items[found].tolist()

    return retrieve


def validation_hr(retrieve, held_out: pd.DataFrame, k: int = 20) -> float:
    pairs = zip(held_out["user_id"].tolist(), held_out["item_id"].tolist())
    return float(np.mean([hit_and_ndcg(retrieve(u, k), t, (k,))[k][0] for u, t in pairs]))


def tuned(train_part: Dataset, name: str, build, grid) -> tuple[object, dict]:
    """The peer built with the grid value that validates best, refit on the whole training part."""
    fit_part, held_out = leave_last_out(train_part)
    fit = Interactions(fit_part)
    scores = {}
    for value in tqdm(grid, desc=f"tune {name}", unit="setting"):
        scores[value] = round(validation_hr(build(fit, value), held_out), 4)
    best = max(scores, key=scores.get)
    return build(Interactions(train_part), best), {"grid": scores, "chosen": best}


def sasrec(train_part: Dataset, users: list[int], depth: int, python: Path, epochs: int):
    """SASRec fitted on the training part in `python` (which has rectools); a retriever of
    (user id, k) -> item ids over the top `depth` it wrote for `users`."""
    with tempfile.TemporaryDirectory() as folder:
        train_csv, users_txt, out = (
            Path(folder) / n for n in ("train.csv", "users.txt", "top.json")
        )
        train_part.interactions[["user_id", "item_id", "timestamp"]].to_csv(train_csv, index=False)
        users_txt.write_text("\n".join(str(u) for u in users))
        command = [str(python), str(ROOT / "bench" / "sasrec_peer.py"), "--train", str(train_csv)]
        command += ["--users", str(users_txt), "--k", str(depth), "--out", str(out)]
        # In the scratch folder: lightning writes its logs where it runs. Its progress shows.
        subprocess.run(command + ["--epochs", str(epochs)], check=True, cwd=folder)
        top = json.loads(out.read_text())
    return lambda user_id, k: top.get(str(user_id), [])[:k]


def peers(
    train_part: Dataset,
    notes: list[str],
    users: list[int],
    depth: int,
    sasrec_python: Path,
    sasrec_epochs: int,
) -> tuple[dict, dict]:
    retrievers, tuning = {}, {}
    if len(np.unique(train_part.interactions["item_id"])) <= MAX_EASE_ITEMS:
        retrievers["ease"], tuning["ease"] = tuned(train_part, "EASE", ease, EASE_L2)
    else:
        notes.append(f"EASE skipped: more than {MAX_EASE_ITEMS:,} items")
    try:
        retrievers["als_implicit"], tuning["als_implicit"] = tuned(
            train_part, "ALS", als, ALS_FACTORS
        )
    except ImportError:
        notes.append("ALS skipped: `implicit` is not installed (pip install -e .[bench])")
    if sasrec_python.exists():
        started = time.perf_counter()
        retrievers["sasrec"] = sasrec(train_part, users, depth, sasrec_python, sasrec_epochs)
        tuning["sasrec"] = {
            "epochs": sasrec_epochs,
            "seconds": round(time.perf_counter() - started, 1),
        }
    else:
        notes.append(
            f"SASRec skipped: no {sasrec_python} (scripts/sasrec-env.sh makes .venv-sasrec)"
        )
    return retrievers, tuning


def pipeline_lists(
    pipelines: dict[str, RecommendPipeline], user_id: int, depth: int
) -> dict[str, list[int]]:
    """The served pipeline's rows (as `recsys eval` reports them), and the ablations: each
    user tower's vector search alone, the item-to-item source alone, the ranker always on."""
    lists = served_lists(pipelines["served"], user_id, depth, 200, ("two_tower", "knn_embed"))
    request = RecommendRequest(user_id=user_id, k=depth, candidates=depth)
    for name, pipeline in pipelines.items():
        if name not in ("served", "ranker_always_on"):
            lists[name] = [c.item_id for c in pipeline.candidates(request).candidates]
    ranked = request.model_copy(update={"candidates": 200})
    lists["ranker_always_on"] = [
        i.item_id for i in pipelines["ranker_always_on"].recommend(ranked).items
    ]
    return lists


def run_protocol(
    dataset: Dataset,
    protocol: str,
    config: TrainConfig,
    notes: list[str],
    validated: bool,
    sasrec_python: Path,
    sasrec_epochs: int,
) -> dict:
    if protocol == "leave-last-out":
        (train_part, test), cutoffs = leave_last_out(dataset), LEAVE_LAST_OUT_CUTOFFS
    else:
        (train_part, test), cutoffs = temporal_split(dataset, 0.2), CUTOFFS
    started = time.perf_counter()
    # As `recsys train --user-tower auto` does: validation on the training part chooses.
    validation = validate(train_part, config, USER_TOWERS) if validated else None
    choices = (
        validation.figures["choices"] if validation else {"user_tower": "mean", "ranker": True}
    )
    pipelines = {}
    for tower in USER_TOWERS:
        chosen = tower == choices["user_tower"]
        bundle, _ = train(
            train_part,
            replace(config, two_tower=replace(config.two_tower, user_tower=tower)),
            validation.ranker_lists if validation and chosen else None,
        )
        bundle.manifest = {"models": {"knn_embed": {}}}
        if chosen:
            bundle.manifest["validation"] = validation.figures if validation else {}
            served = bundle
        pipelines[f"two_tower_{tower}"] = RecommendPipeline(
            bundle, options=PipelineOptions(item_to_item_share=0.0, ranker="off")
        )
    pipelines["served"] = RecommendPipeline(served)
    pipelines["item_to_item"] = RecommendPipeline(
        served, options=PipelineOptions(item_to_item_share=1.0, ranker="off")
    )
    pipelines["ranker_always_on"] = RecommendPipeline(served, options=PipelineOptions(ranker="on"))
    train_seconds = round(time.perf_counter() - started, 1)
    truth = test.groupby("user_id")["item_id"].agg(list)
    depth, sums = max(cutoffs), {}
    retrievers, tuning = peers(
        train_part, notes, truth.index.tolist(), depth, sasrec_python, sasrec_epochs
    )
    for user_id, items in tqdm(
        truth.items(), total=len(truth), desc=f"eval {protocol}", unit="user"
    ):
        lists = pipeline_lists(pipelines, int(user_id), depth)
        lists.update({name: retrieve(int(user_id), depth) for name, retrieve in retrievers.items()})
        for name, ranked in lists.items():
            row = sums.setdefault(name, {})
            if protocol == "leave-last-out":
                for k, (hit, gain) in hit_and_ndcg(ranked, int(items[-1]), cutoffs).items():
                    row[f"HR@{k}"] = row.get(f"HR@{k}", 0.0) + hit
                    row[f"NDCG@{k}"] = row.get(f"NDCG@{k}", 0.0) + gain
            else:
                for k, value in recall_at(ranked, {int(i) for i in items}, cutoffs).items():
                    row[f"Recall@{k}"] = row.get(f"Recall@{k}", 0.0) + value
    rows = {
        name: {m: round(v / len(truth), 4) for m, v in row.items()} for name, row in sums.items()
    }
    return {
        "users": len(truth),
        "train_seconds": train_seconds,
        "choices": choices,
        # The figures behind the ranker's choice: cross-fitted ranked order against retrieval
        # order, HR@10/20 on the training part's held-out interactions.
        "validation_hit_rate": validation.figures["hit_rate"] if validation else None,
        "rows": rows,
        "tuning": tuning,
    }


def table(protocol: str, results: dict) -> str:
    rows = results["rows"]
    metrics = list(next(iter(rows.values())))
    headline = metrics[0]
    peer_names = [n for n in rows if n in PEERS]
    choices = results["choices"]
    best_peer = max(peer_names, key=lambda n: rows[n][headline])
    lines = [
        f"{protocol}: {results['users']} users",
        "| | " + " | ".join(metrics) + " | vs best peer |",
        "|---|" + "---:|" * (len(metrics) + 1),
    ]
    for name, row in rows.items():
        ratio = (
            row[headline] / rows[best_peer][headline] if rows[best_peer][headline] else float("nan")
        )
        lines.append(
            f"| {name} | " + " | ".join(f"{row[m]:.4f}" for m in metrics) + f" | {ratio:.2f}x |"
        )
    lines.append(f"best peer at {headline}: {best_peer}")
    lines.append(
        f"served: {choices['user_tower']} user tower, item-to-item share "
        f"{choices.get('item_to_item_share', 0.0):.2f}, ranker {'on' if choices['ranker'] else 'off'}"
    )
    if "knn_embed" in choices:
        knobs = choices["knn_embed"]
        lines.append(
            f"kNN-Embed (validated): alpha {knobs['alpha']:.2f}, reserved share "
            f"{knobs['reserved_share']:.2f}"
        )
    if results["validation_hit_rate"]:
        hits = results["validation_hit_rate"]
        lines.append(
            f"validation HR@10: ranked (cross-fitted) {hits['pipeline']['@10']:.4f}, "
            f"retrieval order {hits['candidate_generation']['@10']:.4f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = quality_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", action="append", choices=("temporal", "leave-last-out"))
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="serve the mean tower, ranked, no item-to-item source, instead of validating",
    )
    parser.add_argument(
        "--sasrec-python",
        type=Path,
        default=Path(os.environ.get("RECSYS_SASREC_PYTHON", SASREC_PYTHON)),
        help="an interpreter with rectools[torch] 0.19 (scripts/sasrec-env.sh)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dataset = bench_dataset(args)
    config = bench_config(args.quick)
    notes: list[str] = []
    results = {"dataset": dataset.name, "protocols": {}}
    for protocol in args.protocol or ("temporal", "leave-last-out"):
        results["protocols"][protocol] = run_protocol(
            dataset,
            protocol,
            config,
            notes,
            not args.no_validate,
            args.sasrec_python,
            3 if args.quick else 100,
        )
        print(table(protocol, results["protocols"][protocol]), flush=True)
    results["notes"] = sorted(set(notes))
    for note in results["notes"]:
        print(note)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
