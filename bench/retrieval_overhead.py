"""The retrieval stage's work per request against raw FAISS on the same index, same queries.

    python bench/retrieval_overhead.py [--quick] [--json PATH] [--items N]

A synthetic catalog (1M items x 64 dims by default; --quick: 100k) in an IVF index as
`recsys train` would build it (`IVF4096,Flat`, nprobe 32), 10,000 users with 20-item
histories in the in-process embedding table, kNN-Embed clusters over the items. For each
request: the candidate generator's whole retrieval (table reads, user tower, interests,
FAISS, exclusions, merge) for 200 candidates, by strategy, against the raw FAISS calls the
strategy makes for the same user vector on the same indexes: one `Index.search` for 200 +
the excluded items (two_tower), and for knn_embed also the batched `search_preassigned`
over the user's interest clusters. Runs one request at a time, all four interleaved;
reports p50/p99, the ratios and the sizes of the two FAISS indexes. Then the user tower
alone on 50-item histories x 64 dims, for each tower (mean, sequence) in numpy as serving
runs it and in torch, the reference, interleaved; and the two_tower stage again with the
sequence tower.
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.data.histories import UserHistories
from service.data.synthetic import clustered_unit_vectors
from service.embeddings.memory_store import InMemoryEmbeddingStore
from service.embeddings.store import TableConfig
from service.embeddings.tables import INTEREST_TABLE, SMOOTHING_TABLE
from service.retrieval.generator import CandidateGenerator
from service.retrieval.index import ItemIndex, SearchParams, default_factory
from service.retrieval.knn_embed import ItemClusters, MixtureKnobs, interest_counts, split_budget
from service.retrieval.popular import PopularItems
from service.retrieval.two_tower import TwoTower, TwoTowerConfig, UserTowerKernel

USERS, HISTORY, CANDIDATES, CLUSTERS = 10_000, 20, 200, 256


def percentiles(seconds: list[float]) -> dict:
    return {
        "p50_ms": round(float(np.percentile(seconds, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(seconds, 99)) * 1e3, 3),
    }


def user_tower_cost(requests: int, rng: np.random.Generator) -> dict:
    """One user vector from a full history (the longest a model takes), per tower and
    implementation; a fresh history each request, as serving sees."""
    seconds: dict[str, list[float]] = {}
    towers = {}
    for tower in ("mean", "sequence"):
        model = TwoTower(TwoTowerConfig(user_tower=tower), 2, 2, 2).eval()
        towers[tower] = (model, UserTowerKernel(model))
    config = TwoTowerConfig()
    for _ in range(requests):
        user = rng.normal(0, 0.05, (1, config.id_dim)).astype(np.float32)
        history = rng.normal(0, 0.05, (1, config.history_length, config.id_dim))
        history = history.astype(np.float32)
        valid = np.ones((1, config.history_length), bool)
        tensors = (torch.from_numpy(user), torch.from_numpy(history), torch.from_numpy(valid))
        for tower, (model, kernel) in towers.items():
            t = time.perf_counter()
            kernel(user, history, valid)
            seconds.setdefault(f"{tower}_numpy", []).append(time.perf_counter() - t)
            with torch.inference_mode():
                t = time.perf_counter()
                model.user_tower(*tensors)
                seconds.setdefault(f"{tower}_torch", []).append(time.perf_counter() - t)
    return {name: percentiles(times[10:]) for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k items, fewer requests")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    n = args.items or (100_000 if args.quick else 1_000_000)
    requests = 300 if args.quick else 2000
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    item_vectors = clustered_unit_vectors(n, 64)
    item_ids = np.arange(1, n + 1, dtype=np.uint64)
    print(f"building {default_factory(n)} over {n:,} items", flush=True)
    index = ItemIndex.build(item_ids, item_vectors, "auto", SearchParams(nprobe=32))
    clusters = ItemClusters.build(item_ids, item_vectors, CLUSTERS)

    config = TwoTowerConfig()
    model = TwoTower(config, 2, 2, 2).eval()
    user_ids = np.arange(10**12, 10**12 + USERS, dtype=np.uint64)
    history_items = rng.choice(item_ids, size=(USERS, HISTORY))
    histories = UserHistories(
        user_ids, np.arange(0, USERS * HISTORY + 1, HISTORY), history_items.ravel()
    )
    store = InMemoryEmbeddingStore(
        [
            TableConfig("user", config.id_dim),
            TableConfig("item", config.id_dim),
            TableConfig(INTEREST_TABLE, CLUSTERS),
            TableConfig(SMOOTHING_TABLE, CLUSTERS),
        ]
    )
    store.put_many("user", user_ids, rng.normal(0, 0.05, (USERS, config.id_dim)).astype(np.float32))
    for s in range(0, n, 100_000):
        store.put_many(
            "item",
            item_ids[s : s + 100_000],
            rng.normal(0, 0.05, (min(100_000, n - s), config.id_dim)).astype(np.float32),
        )
    item_cluster = clusters.assign(item_vectors)
    counts = interest_counts(
        user_ids,
        histories.offsets,
        item_cluster[(history_items.ravel() - 1).astype(np.int64)],
        CLUSTERS,
        20.0,
    )
    store.put_many(INTEREST_TABLE, user_ids, counts)
    store.put_many(SMOOTHING_TABLE, user_ids, counts[rng.permutation(USERS)] / HISTORY)

    popular = PopularItems("bench", item_ids[:1000], np.zeros(1000, np.float32))
    generator = CandidateGenerator(
        model, index, store, histories, popular, 50, None, clusters, MixtureKnobs()
    )
    sequence_model = TwoTower(replace(config, user_tower="sequence"), 2, 2, 2).eval()
    sequence_generator = CandidateGenerator(
        sequence_model, index, store, histories, popular, 50, None, clusters, MixtureKnobs()
    )
    none = np.empty(0, np.uint64)
    asked = rng.choice(user_ids, requests)
    results = {
        "items": n,
        "dim": config.out_dim,
        "factory": default_factory(n),
        "nprobe": 32,
        "candidates": CANDIDATES,
        "requests": requests,
    }
    for user in asked[:50]:  # warm up
        generator.generate(int(user), CANDIDATES, none, "knn_embed")
    # Interleaved per request, so drift on a shared machine hits all three alike.
    seconds: dict[str, list[float]] = {
        "raw_faiss": [],
        "raw_faiss_knn_embed": [],
        "two_tower": [],
        "knn_embed": [],
        "two_tower_sequence": [],
    }
    knobs = MixtureKnobs()
    for user in asked:
        history, _ = generator.history(int(user))
        vector, _ = generator.user_vector(int(user), history)
        t = time.perf_counter()
        index.index.search(vector, CANDIDATES + len(history))
        seconds["raw_faiss"].append(time.perf_counter() - t)
        # kNN-Embed's own FAISS calls, raw: the per-cluster searches, then the single vector's.
        components, weights, _ = generator.mixture(int(user), knobs)
        budgets = split_budget(CANDIDATES - round(CANDIDATES * knobs.reserved_share), weights)
        components = components[budgets > 0].reshape(-1, 1)
        queries = np.repeat(vector, len(components), 0)
        centroid_scores = np.ascontiguousarray(
            (queries * clusters.centroids[components[:, 0]]).sum(1, keepdims=True)
        )
        t = time.perf_counter()
        clusters.index.search_preassigned(
            queries, int(budgets.max()) + len(history), components, centroid_scores
        )
        index.index.search(vector, CANDIDATES + len(history))
        seconds["raw_faiss_knn_embed"].append(time.perf_counter() - t)
        for strategy in ("two_tower", "knn_embed"):
            t = time.perf_counter()
            generator.generate(int(user), CANDIDATES, none, strategy)
            seconds[strategy].append(time.perf_counter() - t)
        t = time.perf_counter()
        sequence_generator.generate(int(user), CANDIDATES, none, "two_tower")
        seconds["two_tower_sequence"].append(time.perf_counter() - t)
    results.update({name: percentiles(times) for name, times in seconds.items()})
    for strategy, raw in (
        ("two_tower", "raw_faiss"),
        ("knn_embed", "raw_faiss_knn_embed"),
        ("two_tower_sequence", "raw_faiss"),
    ):
        results[strategy]["ratio_p50_to_raw"] = round(
            results[strategy]["p50_ms"] / results[raw]["p50_ms"], 2
        )
    results["index_mib"] = round(index.serialized_bytes() / 2**20, 1)
    results["clusters_mib"] = round(len(faiss.serialize_index(clusters.index)) / 2**20, 1)
    print(
        f"\n{n:,} items x {config.out_dim} dims, {results['factory']} nprobe 32, {CANDIDATES} candidates, one "
        "request at a time"
    )
    print("| | p50 ms | p99 ms | p50 / its raw FAISS calls |")
    print("|---|---|---|---|")
    for name, label, raw in (
        ("raw_faiss", "raw FAISS: one search", None),
        ("two_tower", "retrieval stage, two_tower", "raw_faiss"),
        ("raw_faiss_knn_embed", "raw FAISS: the per-cluster searches + one search", None),
        ("knn_embed", "retrieval stage, knn_embed", "raw_faiss_knn_embed"),
        ("two_tower_sequence", "retrieval stage, two_tower, sequence tower", "raw_faiss"),
    ):
        r = results[name]
        print(
            f"| {label} | {r['p50_ms']} | {r['p99_ms']} | {r['ratio_p50_to_raw'] if raw else 1.0} |"
        )
    print(
        f"\nitem index {results['index_mib']} MiB, kNN-Embed cluster index {results['clusters_mib']} MiB"
    )
    results["user_tower"] = user_tower_cost(requests, rng)
    print(f"\nuser tower alone, {config.history_length}-item history x {config.id_dim} dims")
    print("| tower | numpy p50 ms | numpy p99 ms | torch p50 ms | torch p99 ms |")
    print("|---|---|---|---|---|")
    for tower in ("mean", "sequence"):
        numpy_ms, torch_ms = (results["user_tower"][f"{tower}_{k}"] for k in ("numpy", "torch"))
        print(
            f"| {tower} | {numpy_ms['p50_ms']} | {numpy_ms['p99_ms']} | {torch_ms['p50_ms']} | "
            f"{torch_ms['p99_ms']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
