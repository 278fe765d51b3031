"""Filtered retrieval: recall and latency of a search inside a filter, against exact
filtered search, for filters keeping 50%, 10%, 1% and 0.1% of the catalog.

    python bench/filtered_search.py [--quick] [--json PATH] [--items N ...]

A synthetic catalog of unit vectors (64 dims) around 1,000 centres (as bench/ann_index.py),
in the default index for its size, with two attributes: `bucket`, drawn at random (a
filter on it keeps items anywhere in vector space), and `category`, the item's centre (a
filter on it keeps whole regions: for most queries, regions far from the query, the hard
case). Queries come from the catalog's distribution. For each filter, three ways to serve
it, all through the same index:

- inside: `ItemIndex.search(..., allowed)`, what the service runs;
- fixed probes: IVF with the filter's ID selector at the default nprobe, the plain use of
  faiss's selectors (exact below FLAT_MAX_ITEMS kept items, as inside);
- post-filter: the unfiltered search over-fetching k / kept share (at most 2,048, faiss's
  GPU limit), then dropping what the filter does not keep.

Recall@100 is against exact inner-product search over the kept items. Latency: single
queries one at a time, p50, and the ratio to the unfiltered search's p50 in the same run;
`first ms` is the first query with a new filter (compiling it and what the index derives
from it), which the filter cache then spares.
"""

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.data.synthetic import unit_vectors_around_centres
from service.retrieval.catalog import ItemCatalog
from service.retrieval.index import FLAT_MAX_ITEMS, ItemIndex, default_factory, selector_of
from service.schemas import AttributeCondition

DIM, K, CENTRES, BUCKETS = 64, 100, 1000, 1000
SHARES = (0.5, 0.1, 0.01, 0.001)
POST_FILTER_MAX_K = 2048


def catalog_attributes(ids: np.ndarray, centres: np.ndarray, seed: int) -> ItemCatalog:
    """Attribute values 1..BUCKETS are `bucket=b`, then `category=c`: one of each per item."""
    buckets = np.random.default_rng(seed).integers(0, BUCKETS, len(ids))
    values = [f"bucket={b}" for b in range(BUCKETS)] + [f"category={c}" for c in range(CENTRES)]
    rows = np.zeros((len(ids) + 1, 2), np.int64)
    rows[1:, 0] = buckets + 1
    rows[1:, 1] = BUCKETS + centres + 1
    return ItemCatalog(ids, rows, values)


def percentile_ms(latencies: list[float], q: float) -> float:
    return round(float(np.percentile(latencies, q)) * 1e3, 3)


def recall(found: np.ndarray, truth: list[np.ndarray]) -> float:
    return round(
        float(np.mean([len(np.intersect1d(f, t)) / max(len(t), 1) for f, t in zip(found, truth)])),
        4,
    )


def exact_truth(vectors: np.ndarray, mask: np.ndarray, ids: np.ndarray, queries: np.ndarray):
    kept = np.flatnonzero(mask)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors[kept])
    _, rows = exact.search(queries, min(K, len(kept)))
    return [ids[kept[r[r >= 0]]] for r in rows]


def search_inside(index: ItemIndex, allowed, queries: np.ndarray) -> np.ndarray:
    return index.search(queries, K, allowed)[1]


def fixed_probes(index: ItemIndex, allowed, queries: np.ndarray) -> np.ndarray:
    """faiss's ID selector at the default nprobe, no further probing."""
    if len(allowed) <= FLAT_MAX_ITEMS or not isinstance(index._cpu, faiss.IndexIVF):
        return index.search(queries, K, allowed)[1]
    params = faiss.SearchParametersIVF()
    params.nprobe = index.params.nprobe
    params.sel = selector_of(allowed)
    _, found = index._cpu.search(queries, K, params=params)
    return np.where(found >= 0, found, 0).view(np.uint64)


def post_filter(index: ItemIndex, allowed, queries: np.ndarray) -> np.ndarray:
    fetch = int(min(POST_FILTER_MAX_K, np.ceil(K / max(allowed.share, 1e-9))))
    _, found = index.search(queries, fetch)
    out = np.zeros((len(queries), K), np.uint64)
    for row, ids in enumerate(found):
        kept = ids[allowed.keeps(ids)][:K]
        out[row, : len(kept)] = kept
    return out


def timed_singles(search, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    found, latencies = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(search(q[None, :])[0])
        latencies.append(time.perf_counter() - started)
    return np.stack(found), latencies


def run_size(n: int, n_queries: int, seed: int = 0) -> dict:
    drawn, centres = unit_vectors_around_centres(n + n_queries, DIM, CENTRES, seed)
    vectors, queries, centres = drawn[:n], drawn[n:], centres[:n]
    ids = np.arange(1, n + 1, dtype=np.uint64)
    started = time.perf_counter()
    index = ItemIndex.build(ids, vectors, "auto", seed=seed)
    build_s = time.perf_counter() - started
    attributes = catalog_attributes(ids, centres, seed + 1)
    _, unfiltered = timed_singles(lambda q: index.search(q, K)[1], queries)
    unfiltered_p50 = percentile_ms(unfiltered, 50)
    rows = []
    filters = [(kind, share) for kind in ("bucket", "category") for share in SHARES]
    for kind, share in tqdm(filters, desc=f"filters at {n:,} items", unit="filter"):
        values = [str(v) for v in range(max(1, int(round(share * BUCKETS))))]
        condition = {kind: AttributeCondition(**{"in": values})}
        started = time.perf_counter()
        allowed = attributes.allowed(condition)
        index.search(queries[:1], K, allowed)
        first_ms = round((time.perf_counter() - started) * 1e3, 2)
        mask = np.isin(ids, allowed.ids)
        truth = exact_truth(vectors, mask, ids, queries)
        inside, latencies = timed_singles(partial(search_inside, index, allowed), queries)
        fixed, fixed_latencies = timed_singles(partial(fixed_probes, index, allowed), queries)
        post, post_latencies = timed_singles(partial(post_filter, index, allowed), queries)
        row = {
            "attribute": kind,
            "target_share": share,
            "kept": int(len(allowed)),
            "recall_inside": recall(inside, truth),
            "recall_fixed_probes": recall(fixed, truth),
            "recall_post_filter": recall(post, truth),
            "p50_ms_inside": percentile_ms(latencies, 50),
            "p99_ms_inside": percentile_ms(latencies, 99),
            "p50_ms_fixed_probes": percentile_ms(fixed_latencies, 50),
            "p50_ms_post_filter": percentile_ms(post_latencies, 50),
            "p50_vs_unfiltered": round(percentile_ms(latencies, 50) / unfiltered_p50, 2),
            "first_ms": first_ms,
        }
        rows.append(row)
        print(row, flush=True)
    return {
        "items": n,
        "factory": default_factory(n),
        "nprobe": index.params.nprobe,
        "build_s": round(build_s, 1),
        "unfiltered_p50_ms": unfiltered_p50,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"\n{result['items']:,} items, {result['factory']}, nprobe {result['nprobe']}; "
        f"unfiltered single-query p50 {result['unfiltered_p50_ms']} ms",
        "| filter on | kept | recall@100 inside | fixed probes | post-filter "
        "| p50 ms inside | p99 ms | x unfiltered | fixed-probes p50 | post-filter p50 | first ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['attribute']} {r['target_share']:.1%} | {r['kept']:,} | "
            f"{r['recall_inside']:.4f} | {r['recall_fixed_probes']:.4f} | "
            f"{r['recall_post_filter']:.4f} | {r['p50_ms_inside']} | {r['p99_ms_inside']} | "
            f"{r['p50_vs_unfiltered']} | {r['p50_ms_fixed_probes']} | "
            f"{r['p50_ms_post_filter']} | {r['first_ms']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k items, 200 queries")
    parser.add_argument("--items", type=int, nargs="+", help="catalog sizes (default 100k 1M)")
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = args.items or ([100_000] if args.quick else [100_000, 1_000_000])
    n_queries = args.queries or (200 if args.quick else 500)
    results = {"k": K, "queries": n_queries, "sizes": [run_size(n, n_queries) for n in sizes]}
    for result in results["sizes"]:
        print(table(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
