"""Offline evaluation on a temporal split: Recall@K of the full pipeline, of candidate
generation alone, and of a most-popular baseline, all through the serving code."""

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from service.artifacts import ranker_serves
from service.bundle import ModelBundle
from service.data.context import context_rows
from service.data.feature_space import FeatureSpace
from service.data.schema import Dataset
from service.data.split import leave_last_out
from service.pipeline.in_process import PipelineOptions, RecommendPipeline
from service.ranking.encoder import RankingEncoder
from service.retrieval.candidates import STRATEGY_KNN_EMBED, STRATEGY_TWO_TOWER
from service.retrieval.knn_embed import MixtureKnobs
from service.retrieval.two_tower import item_vectors
from service.schemas import RecommendRequest
from service.training.artifact import TrainConfig, Validation, train, train_and_save
from service.training.ranker import CandidateLists, ranked_places, train_listwise_ranker

log = logging.getLogger(__name__)

CUTOFFS = (10, 50, 100)


def recall_at(ranked: list[int], relevant: set[int], cutoffs=CUTOFFS) -> dict[int, float]:
    """Share of the relevant items found in the first K of `ranked`, for each K."""
    hits = np.cumsum([item in relevant for item in ranked]) if ranked else np.zeros(0)
    return {
        k: (float(hits[min(k, len(hits)) - 1]) if len(hits) else 0.0) / len(relevant)
        for k in cutoffs
    }


def served_lists(
    pipeline: RecommendPipeline,
    user_id: int,
    depth: int,
    candidates: int,
    strategies: tuple[str, ...],
) -> dict[str, list[int]]:
    """A user's top `depth` items, best first, as each row of the results gets them:
    `pipeline` (ranked, from `candidates` retrieved) and `candidate_generation` (retrieval
    order) for each strategy, the pipeline's default unsuffixed and others as `_<name>`;
    `most_popular` (the training items the user has not seen)."""
    request = RecommendRequest(user_id=user_id, k=depth, candidates=max(candidates, depth))
    lists = {}
    for strategy in strategies:
        suffix = "" if strategy == pipeline.options.strategy else f"_{strategy}"
        asked = request.model_copy(update={"strategy": strategy})
        lists[f"pipeline{suffix}"] = [item.item_id for item in pipeline.recommend(asked).items]
        retrieval = asked.model_copy(update={"candidates": depth})
        lists[f"candidate_generation{suffix}"] = [
            c.item_id for c in pipeline.candidates(retrieval).candidates
        ]
    seen = pipeline.generator.history(user_id)[0]
    lists["most_popular"] = pipeline.generator.popular.top(depth, np.unique(seen)).item_ids.tolist()
    return lists


def evaluate_pipeline(
    pipeline: RecommendPipeline, test: pd.DataFrame, candidates: int = 200, cutoffs=CUTOFFS
) -> dict:
    """The temporal protocol: Recall@K of each user's held-out items."""
    depth = max(cutoffs)
    relevant = test.groupby("user_id")["item_id"].agg(lambda s: {int(i) for i in s})
    sums: dict[str, dict[int, float]] = {}
    for user_id, truth in tqdm(
        relevant.items(), total=len(relevant), desc="eval", unit="user", mininterval=2
    ):
        lists = served_lists(
            pipeline, int(user_id), depth, candidates, (pipeline.options.strategy,)
        )
        for name, ranking in lists.items():
            for k, value in recall_at(ranking, truth, cutoffs).items():
                sums.setdefault(name, dict.fromkeys(cutoffs, 0.0))[k] += value
    users = len(relevant)
    return {
        "protocol": "temporal",
        "users": users,
        "candidates": candidates,
        "recall": {
            name: {f"@{k}": round(v / users, 4) for k, v in by_k.items()}
            for name, by_k in sums.items()
        },
    }


LEAVE_LAST_OUT_CUTOFFS = (10, 20)


def hit_and_ndcg(ranked: list[int], target: int, cutoffs=LEAVE_LAST_OUT_CUTOFFS) -> dict:
    """HR@K (the held-out item is in the first K) and NDCG@K (1 / log2(1 + its rank), 0
    outside the first K) of one held-out item, for each K."""
    rank = ranked.index(target) + 1 if target in ranked else None
    return {
        k: (1.0, 1.0 / float(np.log2(1 + rank))) if rank is not None and rank <= k else (0.0, 0.0)
        for k in cutoffs
    }


def evaluate_leave_last_out(
    pipeline: RecommendPipeline,
    test: pd.DataFrame,
    candidates: int = 200,
    cutoffs=LEAVE_LAST_OUT_CUTOFFS,
    strategies: tuple[str, ...] = (STRATEGY_TWO_TOWER, STRATEGY_KNN_EMBED),
) -> dict:
    """The leave-last-out protocol (S3-Rec, TIGER): each user's one held-out item, the
    whole catalogue ranked with the user's training items left out; HR@K and NDCG@K."""
    depth = max(cutoffs)
    sums: dict[str, dict[int, list[float]]] = {}
    targets = test.drop_duplicates("user_id", keep="last")
    for user_id, target in tqdm(
        zip(targets["user_id"].tolist(), targets["item_id"].tolist()),
        total=len(targets),
        desc="eval",
        unit="user",
        mininterval=2,
    ):
        for name, ranking in served_lists(pipeline, user_id, depth, candidates, strategies).items():
            for k, (hit, gain) in hit_and_ndcg(ranking, target, cutoffs).items():
                totals = sums.setdefault(name, {c: [0.0, 0.0] for c in cutoffs})[k]
                totals[0] += hit
                totals[1] += gain
    users = len(targets)
    return {
        "protocol": "leave-last-out",
        "users": users,
        "candidates": candidates,
        "hit_rate": {
            name: {f"@{k}": round(v[0] / users, 4) for k, v in by_k.items()}
            for name, by_k in sums.items()
        },
        "ndcg": {
            name: {f"@{k}": round(v[1] / users, 4) for k, v in by_k.items()}
            for name, by_k in sums.items()
        },
    }


VALIDATION_USERS = 2000  # held-out users scored at most: a bounded budget on large sets
VALIDATION_CUTOFF = 10
RANKED_CANDIDATES = 200  # what validation retrieves for the ranker, as `evaluate_*` rank


ITEM_TO_ITEM_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)  # the item-to-item source's shares tried
CHOICE_TOLERANCE = 0.01  # relative: within 1% of the best validation figure counts as a tie
MIN_RANKER_LISTS = 20  # lists that hold the item: fewer teach a ranker nothing it can show
KNN_EMBED_DEPTH = 100  # kNN-Embed's knobs are judged on the top 100, as docs/retrieval.md reports
KNN_EMBED_KNOBS = tuple(  # (alpha, reserved share) tried; m stays the setting's
    (alpha, reserved) for alpha in (0.0, 0.5) for reserved in (0.2, 0.5, 0.8)
)


def candidate_lists(
    pipeline: RecommendPipeline, held_out: pd.DataFrame, depth: int = RANKED_CANDIDATES
) -> CandidateLists:
    """Each held-out interaction's candidates from `pipeline`'s retrieval, in its order, and
    where the interacted item is among them; hour and weekday of the interaction's time."""
    rows = list(zip(held_out["user_id"].tolist(), held_out["item_id"].tolist()))
    ids = np.zeros((len(rows), depth), np.uint64)
    scores = np.zeros((len(rows), depth), np.float32)
    present = np.zeros((len(rows), depth), bool)
    targets = np.full(len(rows), -1)
    for n, (user_id, item_id) in enumerate(
        tqdm(rows, desc="candidate lists", unit="user", mininterval=2)
    ):
        found = pipeline.retrieve(
            RecommendRequest(user_id=user_id, k=VALIDATION_CUTOFF, candidates=depth)
        )
        length = len(found)
        ids[n, :length], scores[n, :length], present[n, :length] = (
            found.item_ids,
            found.scores,
            True,
        )
        hit = np.flatnonzero(found.item_ids == item_id)
        targets[n] = hit[0] if len(hit) else -1
    hour, weekday = context_rows(held_out["timestamp"].to_numpy())
    return CandidateLists(
        held_out["user_id"].to_numpy(np.uint64), ids, present, scores, targets, hour, weekday
    )


def hit_and_ndcg_of_places(places: np.ndarray, cutoffs=LEAVE_LAST_OUT_CUTOFFS) -> dict:
    """HR@K and NDCG@K (dicts by "@K") of held-out items at `places` (0 = first, -1 = absent)."""
    found = places >= 0
    gain = np.where(found, 1.0 / np.log2(np.maximum(places, 0) + 2), 0.0)
    return {
        "hit_rate": {f"@{k}": round(float((found & (places < k)).mean()), 4) for k in cutoffs},
        "ndcg": {f"@{k}": round(float(np.where(places < k, gain, 0.0).mean()), 4) for k in cutoffs},
    }


def clusters_covered(bundle: ModelBundle, lists: CandidateLists) -> float:
    """Mean number of distinct kNN-Embed clusters among each list's items."""
    clusters = bundle.mixtures.cluster_of(lists.item_ids.ravel()).reshape(lists.item_ids.shape)
    clusters = np.where(lists.present, clusters, -1)
    return round(float(np.mean([len(np.unique(row[row >= 0])) for row in clusters])), 4)


def choose_knn_embed(
    bundle: ModelBundle,
    held_out: pd.DataFrame,
    item_to_item_share: float,
    knobs_tried: tuple[tuple[float, float], ...] = KNN_EMBED_KNOBS,
    depth: int = KNN_EMBED_DEPTH,
) -> dict:
    """kNN-Embed's alpha and reserved share for `bundle` (trained without `held_out`), and
    the figures behind them: each pair's HR@`depth` of the held-out items and clusters
    covered in the top `depth`, beside the single vector's. kNN-Embed is there for diversity
    without losing recall, so the pairs that hold the single vector's HR and cover more
    clusters qualify, and the one with the best HR among them (the first on ties) is kept;
    where none qualifies, the whole budget goes to the single vector (reserved share 1)."""

    def figures(strategy: str, alpha: float, reserved_share: float) -> dict:
        options = PipelineOptions(
            strategy=strategy,
            knn_alpha=alpha,
            knn_reserved_share=reserved_share,
            item_to_item_share=item_to_item_share,
            ranker="off",
        )
        found = candidate_lists(RecommendPipeline(bundle, options=options), held_out, depth)
        return {
            "hit_rate": hit_and_ndcg_of_places(found.targets, (depth,))["hit_rate"][f"@{depth}"],
            "clusters": clusters_covered(bundle, found),
        }

    default = MixtureKnobs()
    single = figures(STRATEGY_TWO_TOWER, default.alpha, default.reserved_share)
    tried = [
        {"alpha": alpha, "reserved_share": reserved, **figures(STRATEGY_KNN_EMBED, alpha, reserved)}
        for alpha, reserved in knobs_tried
    ]
    holding = [
        t
        for t in tried
        if t["hit_rate"] >= single["hit_rate"] and t["clusters"] > single["clusters"]
    ]
    if holding:
        best = max(t["hit_rate"] for t in holding)
        kept = next(t for t in holding if t["hit_rate"] == best)
        choice = {"alpha": kept["alpha"], "reserved_share": kept["reserved_share"]}
    else:
        choice = {"alpha": default.alpha, "reserved_share": 1.0}
    log.info(
        "validation, kNN-Embed: alpha %.2f, reserved share %.2f (single vector HR@%d %.4f, "
        "%.2f clusters; %s)",
        choice["alpha"],
        choice["reserved_share"],
        depth,
        single["hit_rate"],
        single["clusters"],
        ", ".join(
            f"{t['alpha']:.1f}/{t['reserved_share']:.1f} {t['hit_rate']:.4f} {t['clusters']:.2f}"
            for t in tried
        ),
    )
    return {"depth": depth, "single_vector": single, "tried": tried, "choice": choice}


def cross_fitted_places(
    lists: CandidateLists, features: FeatureSpace, config: TrainConfig, folds: int = 2
) -> np.ndarray:
    """Where a ranker trained on the other folds' lists (by user, seeded) puts each list's
    held-out item: the ranker's validation figure, on lists it never trained on."""
    score_scale = 1.0 / config.two_tower.temperature
    fold = np.random.default_rng(config.ranker.seed).permutation(len(lists)) % folds
    places = np.full(len(lists), -1)
    for k in range(folds):
        model, _, _ = train_listwise_ranker(
            lists.take(np.flatnonzero(fold != k)), features, config.ranker, score_scale
        )
        this = np.flatnonzero(fold == k)
        places[this] = ranked_places(model, RankingEncoder(features, score_scale), lists.take(this))
    return places


def validate(
    dataset: Dataset,
    config: TrainConfig,
    user_towers: tuple[str, ...] = (),
    max_users: int = VALIDATION_USERS,
    item_to_item_shares: tuple[float, ...] = ITEM_TO_ITEM_SHARES,
) -> Validation:
    """What `recsys train` chooses, the figures behind it, and the lists its ranker learns
    from: the configuration trained on each user's history but the last interaction, then
    that interaction of up to `max_users` users (seeded sample) retrieved for through the
    serving code.

    - Each of `user_towers` is trained (none: the configuration's own), and each is served
      with each of `item_to_item_shares` of the candidates from the item-to-item source.
    - The first combination (the mean tower before the sequence one, smaller shares before
      larger) whose retrieval validates (HR@10) within `CHOICE_TOLERANCE` of the best is
      kept: a more costly choice has to earn more than the noise of a few users.
    - kNN-Embed's knobs are chosen on that combination (`choose_knn_embed`).
    - The ranker learns from that combination's candidate lists, and serves only if, cross-
      fitted (trained on half the users, placing the other half's items), it beats retrieval
      order by more than `CHOICE_TOLERANCE`: on some data it cannot add what retrieval
      lacks, and then answers are never made worse by it."""
    fit_part, held_out = leave_last_out(dataset)
    if len(held_out) > max_users:
        held_out = held_out.sample(max_users, random_state=0).sort_values("user_id")
    at = f"@{VALIDATION_CUTOFF}"
    tried, found_by_combination = [], []  # (candidate lists, their bundle), as tried
    for tower in user_towers or (config.two_tower.user_tower,):
        tower_config = replace(config, two_tower=replace(config.two_tower, user_tower=tower))
        bundle, _ = train(fit_part, tower_config, ranker=False)  # its lists teach the ranker
        for share in item_to_item_shares:
            pipeline = RecommendPipeline(
                bundle, options=PipelineOptions(item_to_item_share=share, ranker="off")
            )
            found = candidate_lists(pipeline, held_out)
            figures = hit_and_ndcg_of_places(found.targets)
            log.info(
                "validation, %s user tower, item-to-item share %.2f, %d users: retrieval HR%s %.4f",
                tower,
                share,
                len(found),
                at,
                figures["hit_rate"][at],
            )
            tried.append(
                {
                    "user_tower": tower,
                    "item_to_item_share": share,
                    "retrieval_hit_rate": figures["hit_rate"][at],
                }
            )
            found_by_combination.append((found, bundle))
    best = max(t["retrieval_hit_rate"] for t in tried)
    chosen = next(
        n for n, t in enumerate(tried) if t["retrieval_hit_rate"] >= best * (1 - CHOICE_TOLERANCE)
    )
    tower_config = replace(
        config, two_tower=replace(config.two_tower, user_tower=tried[chosen]["user_tower"])
    )
    lists, bundle = found_by_combination[chosen]
    knn_embed = choose_knn_embed(bundle, held_out, tried[chosen]["item_to_item_share"])
    retrieval = hit_and_ndcg_of_places(lists.targets)
    usable = int((lists.targets >= 0).sum())
    if usable >= MIN_RANKER_LISTS:
        ranked = hit_and_ndcg_of_places(cross_fitted_places(lists, bundle.features, tower_config))
        ranker_training = "cross-fitted on 2 folds of the users, trained on their candidate lists"
    else:  # nothing to learn reordering from: the pointwise ranker is trained, not served
        ranked = retrieval
        ranker_training = f"not trained: {usable} candidate lists held the item"
    ranker = ranked["hit_rate"][at] > retrieval["hit_rate"][at] * (1 + CHOICE_TOLERANCE)
    log.info(
        "validation chose the %s user tower, item-to-item share %.2f, the ranker %s "
        "(cross-fitted HR%s %.4f, retrieval order %.4f)",
        tried[chosen]["user_tower"],
        tried[chosen]["item_to_item_share"],
        "on" if ranker else "off (it does not lift)",
        at,
        ranked["hit_rate"][at],
        retrieval["hit_rate"][at],
    )
    return Validation(
        {
            "protocol": "leave-last-out on the training data",
            "users": len(lists),
            "ranker": ranker_training,
            "hit_rate": {
                "pipeline": ranked["hit_rate"],
                "candidate_generation": retrieval["hit_rate"],
            },
            "ndcg": {"pipeline": ranked["ndcg"], "candidate_generation": retrieval["ndcg"]},
            "tried": tried,
            "knn_embed": knn_embed,
            "choices": {
                "ranker": bool(ranker),
                "user_tower": tried[chosen]["user_tower"],
                "item_to_item_share": tried[chosen]["item_to_item_share"],
                "knn_embed": knn_embed["choice"],
            },
        },
        lists if usable >= MIN_RANKER_LISTS else None,
    )


def train_validated(
    dataset: Dataset, out: str | Path, config: TrainConfig, user_towers: tuple[str, ...] = ()
) -> Path:
    """What `recsys train` writes: `validate` chooses (the user tower among `user_towers`,
    none: the configuration's own), then the artifact is trained with its choices."""
    validation = validate(dataset, config, user_towers)
    chosen = validation.figures["choices"]["user_tower"]
    config = replace(config, two_tower=replace(config.two_tower, user_tower=chosen))
    return train_and_save(dataset, str(out), config, validation)


def evaluate_artifact(folder: str | Path, test: pd.DataFrame, protocol: str = "temporal") -> dict:
    bundle = ModelBundle.load(folder)
    pipeline = RecommendPipeline(bundle)
    if protocol == "leave-last-out":
        results = evaluate_leave_last_out(pipeline, test)
    else:
        results = evaluate_pipeline(pipeline, test)
    results["model_version"] = bundle.version
    results["ranker_serves"] = ranker_serves(bundle.manifest)
    if "validation" in bundle.manifest:
        results["validation"] = bundle.manifest["validation"]
    results["ranker_val_auc"] = bundle.manifest["metrics"]["ranker"]["val_auc"]
    results["ranker_training"] = bundle.manifest["metrics"]["ranker"].get(
        "training",
        "pointwise, on the training interactions",  # artifacts from before lists
    )
    results["train_seconds"] = bundle.manifest["metrics"]["train_seconds"]
    return results


def format_table(results: dict) -> str:
    if results.get("protocol") == "leave-last-out":
        return format_leave_last_out_table(results)
    recall = results["recall"]
    cutoffs = list(next(iter(recall.values())))
    lines = [
        f"Recall on {results['users']} users (temporal split)",
        "| | " + " | ".join(f"Recall{c}" for c in cutoffs) + " |",
    ]
    lines.append("|---|" + "---|" * len(cutoffs))
    for name, by_k in recall.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_k[c]:.4f}" for c in cutoffs) + " |")
    base, full = recall["most_popular"]["@50"], recall["pipeline"]["@50"]
    if base > 0:
        lines.append(f"pipeline vs most_popular at Recall@50: {full / base - 1:+.1%}")
    lines.append(ranker_line(results))
    lines.extend(choices_line(results))
    return "\n".join(lines)


def ranker_line(results: dict) -> str:
    """Whether the pipeline rows were ranked, and the validation that decided it."""
    validation = results.get("validation")
    if validation is None:
        return "pipeline: ranked (the artifact was trained without validation)"
    hits = validation["hit_rate"]
    figures = (
        f"validation HR@{VALIDATION_CUTOFF} on {validation['users']} users: ranked (cross-fitted) "
        f"{hits['pipeline'][f'@{VALIDATION_CUTOFF}']:.4f}, retrieval order "
        f"{hits['candidate_generation'][f'@{VALIDATION_CUTOFF}']:.4f}"
    )
    if results.get("ranker_serves", True):
        return f"pipeline: ranked ({figures})"
    return f"pipeline: retrieval order, the ranker does not lift ({figures})"


def choices_line(results: dict) -> list[str]:
    """What validation chose among several combinations, with each one's figure."""
    validation = results.get("validation", {})
    tried, choices, lines = validation.get("tried", []), validation.get("choices", {}), []
    if len(tried) > 1:
        figures = ", ".join(
            f"{t['user_tower']}/{t['item_to_item_share']:.2f} {t['retrieval_hit_rate']:.4f}"
            for t in tried
        )
        lines.append(
            f"chosen on validation: {choices['user_tower']} user tower, item-to-item share "
            f"{choices['item_to_item_share']:.2f} (retrieval HR@{VALIDATION_CUTOFF}: {figures})"
        )
    knn_embed = validation.get("knn_embed")
    if knn_embed is not None:
        single, depth = knn_embed["single_vector"], knn_embed["depth"]
        lines.append(
            f"kNN-Embed: alpha {choices['knn_embed']['alpha']:.2f}, reserved share "
            f"{choices['knn_embed']['reserved_share']:.2f} (HR@{depth} / clusters@{depth}: single "
            f"vector {single['hit_rate']:.4f} / {single['clusters']:.2f}; "
            + ", ".join(
                f"{t['alpha']:.1f}/{t['reserved_share']:.1f} {t['hit_rate']:.4f} / "
                f"{t['clusters']:.2f}"
                for t in knn_embed["tried"]
            )
            + ")"
        )
    return lines


def format_leave_last_out_table(results: dict) -> str:
    hits, ndcg = results["hit_rate"], results["ndcg"]
    cutoffs = list(next(iter(hits.values())))
    lines = [
        f"HR and NDCG on {results['users']} users (leave-last-out: each user's last interaction "
        "held out, the whole catalogue ranked)",
        "| | " + " | ".join([f"HR{c}" for c in cutoffs] + [f"NDCG{c}" for c in cutoffs]) + " |",
        "|---|" + "---|" * (2 * len(cutoffs)),
    ]
    for name in hits:
        values = [hits[name][c] for c in cutoffs] + [ndcg[name][c] for c in cutoffs]
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    first = cutoffs[0]
    for label, better, worse in (
        ("pipeline vs most_popular", "pipeline", "most_popular"),
        ("ranked vs retrieval order", "pipeline", "candidate_generation"),
    ):
        if hits[worse][first] > 0:
            change = hits[better][first] / hits[worse][first] - 1
            lines.append(f"{label} at HR{first}: {change:+.1%}")
    lines.append(ranker_line(results))
    lines.extend(choices_line(results))
    return "\n".join(lines)


RETRIEVAL_CUTOFFS = (50, 100, 200)
Retriever = Callable[[int, int], list[int]]  # (user id, K) -> item ids, best first


@dataclass
class RetrievalEvaluator:
    """Recall and diversity of candidate generation strategies on held-out interactions.

    Diversity is measured on each user's top-K: distinct item clusters (kNN-Embed's) and
    distinct attribute values (categories, genres), the share of the clusters of the user's
    held-out items that the top-K covers, and intra-list distance (mean 1 - cosine between
    the item vectors of the list)."""

    bundle: ModelBundle
    test: pd.DataFrame
    cutoffs: tuple[int, ...] = RETRIEVAL_CUTOFFS

    def __post_init__(self) -> None:
        self.relevant = self.test.groupby("user_id")["item_id"].agg(
            lambda s: np.unique(s.to_numpy(np.uint64))
        )
        features = self.bundle.features
        self.item_ids = features.items.ids
        self.vectors = item_vectors(self.bundle.two_tower, features)
        self.clusters = self.bundle.mixtures.cluster_of(self.item_ids)
        self.attributes = features.item_attributes[1:]  # aligned with item_ids

    def _rows(self, items: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(self.item_ids, items), len(self.item_ids) - 1)
        return at[self.item_ids[at] == items]

    def list_metrics(self, ranked: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        rows = self._rows(ranked)
        clusters = np.unique(self.clusters[rows])
        values = np.unique(self.attributes[rows])
        vectors = self.vectors[rows]
        n = len(rows)
        if n > 1:
            similarity = vectors @ vectors.T
            distance = float(
                (n * n - similarity.sum()) / (n * (n - 1))
            )  # off-diagonal mean of 1 - cos
        else:
            distance = 0.0
        wanted = np.unique(self.clusters[self._rows(truth)])
        return {
            "recall": float(np.isin(truth, ranked).sum()) / len(truth),
            "clusters": float(len(clusters)),
            "attribute_values": float(len(values[values > 0])),
            "cluster_coverage": float(np.isin(wanted, clusters).mean()) if len(wanted) else 0.0,
            "intra_list_distance": distance,
        }

    def evaluate(self, strategies: dict[str, Retriever]) -> dict:
        sums = {name: {k: {} for k in self.cutoffs} for name in strategies}
        for user_id, truth in tqdm(
            self.relevant.items(), total=len(self.relevant), desc="eval", unit="user", mininterval=2
        ):
            for name, retrieve in strategies.items():
                for k in self.cutoffs:
                    ranked = np.asarray(retrieve(int(user_id), k), dtype=np.uint64)[:k]
                    for metric, value in self.list_metrics(ranked, truth).items():
                        sums[name][k][metric] = sums[name][k].get(metric, 0.0) + value
        users = len(self.relevant)
        return {
            "users": users,
            "clusters": self.bundle.clusters.n_clusters,
            "strategies": {
                name: {
                    f"@{k}": {m: round(v / users, 4) for m, v in by_metric.items()}
                    for k, by_metric in by_k.items()
                }
                for name, by_k in sums.items()
            },
        }


def pipeline_retrievers(
    pipeline: RecommendPipeline, knobs: MixtureKnobs, validated: MixtureKnobs | None = None
) -> dict[str, Retriever]:
    """The serving code's strategies: most-popular, single vector, interests without
    smoothing (a = 0), kNN-Embed at `knobs`, and at `validated` when given."""
    generator = pipeline.generator
    no_exclusions = np.empty(0, np.uint64)

    def most_popular(user_id: int, k: int) -> list[int]:
        return generator.popular.top(k, np.unique(generator.history(user_id)[0])).item_ids.tolist()

    def strategy(name: str, strategy_knobs: MixtureKnobs) -> Retriever:
        return lambda user_id, k: generator.generate(
            user_id, k, no_exclusions, name, strategy_knobs
        ).item_ids.tolist()

    return {
        "most_popular": most_popular,
        "two_tower": strategy(STRATEGY_TWO_TOWER, knobs),
        "mixture_unsmoothed": strategy(STRATEGY_KNN_EMBED, replace(knobs, alpha=0.0)),
        "knn_embed": strategy(STRATEGY_KNN_EMBED, knobs),
        **({"knn_embed_validated": strategy(STRATEGY_KNN_EMBED, validated)} if validated else {}),
    }


def format_retrieval_table(results: dict) -> str:
    metrics = ("recall", "clusters", "attribute_values", "cluster_coverage", "intra_list_distance")
    lines = [
        f"Candidate generation on {results['users']} users ({results['clusters']} item clusters)"
    ]
    cutoffs = list(next(iter(results["strategies"].values())))
    middle = cutoffs[len(cutoffs) // 2]  # diversity at the middle cutoff, @100 by default
    header = ["strategy"] + [f"R{c}" for c in cutoffs] + [f"{m}{middle}" for m in metrics[1:]]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, by_k in results["strategies"].items():
        row = (
            [name]
            + [f"{by_k[c]['recall']:.4f}" for c in cutoffs]
            + [f"{by_k[middle][m]:.4f}" for m in metrics[1:]]
        )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
