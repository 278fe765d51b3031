"""ANN recall against exact search, with latency, for each index type the service can build.

    python bench/ann_index.py [--quick] [--json PATH] [--items N] [--index TYPE ...] [--ef-search N ...]

A synthetic catalog of unit vectors (64 dims) drawn around 1,000 centres, like trained item
vectors; queries come from the same distribution. For each factory string and search knob:
recall@100 against exact inner-product search (IndexFlatIP on the same vectors), single-query
latency p50/p99, batched throughput, build time and index size, all in one run. Exact
search is the baseline row.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.data.synthetic import clustered_unit_vectors
from service.retrieval.index import ItemIndex, SearchParams, default_factory

DIM, K = 64, 100


def measure(index: ItemIndex, queries: np.ndarray, truth: np.ndarray, singles: int) -> dict:
    started = time.perf_counter()
    _, found = index.search(queries, K)
    batched = len(queries) / (time.perf_counter() - started)
    recall = np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found.view(np.int64), truth)])
    latencies = []
    for q in queries[:singles]:
        t = time.perf_counter()
        index.search(q[None, :], K)
        latencies.append(time.perf_counter() - t)
    return {
        "recall_at_100": round(float(recall), 4),
        "single_p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
        "single_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 3),
        "batched_qps": round(batched, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k items and fewer settings")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--index",
        action="append",
        choices=("Flat", "IVF,Flat", "IVF,SQ8", "HNSW32"),
        help="only these types (repeatable)",
    )
    parser.add_argument("--ef-search", type=int, nargs="+", help="HNSW efSearch values to measure")
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: faiss-gpu (pip install -e .[gpu])",
    )
    args = parser.parse_args()
    n = args.items or (100_000 if args.quick else 1_000_000)
    n_queries, singles = (500, 200) if args.quick else (1000, 500)
    drawn = clustered_unit_vectors(n + n_queries, DIM)  # queries from the catalog's distribution
    vectors, queries = drawn[:n], drawn[n:]
    ids = np.arange(1, n + 1, dtype=np.uint64)
    auto = default_factory(n).removeprefix("IDMap2,")
    nlist = auto.split(",")[0].removeprefix("IVF") if auto.startswith("IVF") else "1024"
    settings = [("Flat", [SearchParams()])]
    settings.append(
        (
            f"IVF{nlist},Flat",
            [
                SearchParams(nprobe=p)
                for p in ((16, 32, 64) if args.quick else (8, 16, 32, 64, 128))
            ],
        )
    )
    settings.append(
        (
            f"IVF{nlist},SQ8",
            [SearchParams(nprobe=p) for p in ((32,) if args.quick else (16, 32, 64))],
        )
    )
    settings.append(
        (
            "HNSW32",
            [
                SearchParams(ef_search=e)
                for e in (
                    args.ef_search or ((128, 384) if args.quick else (64, 128, 256, 384, 512))
                )
            ],
        )
    )
    if args.index:
        settings = [(f, p) for f, p in settings if f.replace(nlist, "") in args.index]

    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    _, truth = exact.search(queries, K)
    truth = truth + 1  # ids are rows + 1

    rows = []
    for factory, params_list in tqdm(settings, desc="index types", unit="type"):
        started = time.perf_counter()
        index = ItemIndex.build(ids, vectors, factory, params_list[0], device=args.device)
        build = time.perf_counter() - started
        size = index.serialized_bytes()
        for params in params_list:
            index.set_params(params)
            row = {
                "factory": factory,
                "nprobe": params.nprobe if "IVF" in factory else None,
                "ef_search": params.ef_search if "HNSW" in factory else None,
                "device": index.device,
                "build_s": round(build, 1),
                "index_mb": round(size / 2**20, 1),
            }
            row.update(measure(index, queries, truth, singles))
            rows.append(row)
            print(row, flush=True)
        del index
    results = {
        "items": n,
        "dim": DIM,
        "queries": n_queries,
        "default_factory": default_factory(n),
        "rows": rows,
    }
    print(f"\n{n:,} items x {DIM} dims, recall@{K} against exact search")
    print(
        "| index | knob | device | recall@100 | single p50 ms | single p99 ms | batched q/s | build s | MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        knob = (
            f"nprobe={r['nprobe']}"
            if r["nprobe"]
            else (f"efSearch={r['ef_search']}" if r["ef_search"] else "exact")
        )
        print(
            f"| {r['factory']} | {knob} | {r['device']} | {r['recall_at_100']:.4f} | {r['single_p50_ms']} | "
            f"{r['single_p99_ms']} | {r['batched_qps']} | {r['build_s']} | {r['index_mb']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
