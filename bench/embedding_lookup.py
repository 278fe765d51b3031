"""Batched embedding lookups: the table's Redis path against raw redis-py MGET of the same
keys, in the same run, on a standalone server and on a 3-master Cluster (both started
here on loopback). Also bytes per id in Redis (MEMORY USAGE), float32 vs float16.

    python bench/embedding_lookup.py [--quick] [--json PATH]
"""

import argparse
import json
import platform
import time
import uuid

import numpy as np
import redis
from redis.cluster import RedisCluster

from service.embeddings import TableConfig
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig
from service.testing.redis_servers import RedisClusterServers, RedisServer

DIM = 64
BATCHES = (64, 512, 4096)


def zipf_ids(
    rng: np.random.Generator, ids: np.ndarray, size: int, exponent: float = 1.1
) -> np.ndarray:
    ranks = np.minimum(rng.zipf(exponent, size=size), len(ids)) - 1
    return ids[ranks]


def time_calls(call, requests: list, warmup: int = 3) -> float:
    for request in requests[:warmup]:
        call(request)
    started = time.perf_counter()
    for request in requests:
        call(request)
    return time.perf_counter() - started


def measure(
    url: str, cluster: bool, n_ids: int, rounds: int, rng: np.random.Generator
) -> list[dict]:
    table = TableConfig("bench", DIM)
    namespace = uuid.uuid4().hex[:6]
    plain = RedisEmbeddingStore(
        [table],
        RedisStoreConfig(
            url, cluster=cluster, namespace=namespace, cache_entries=0, socket_timeout=5
        ),
    )
    cached = RedisEmbeddingStore(
        [table],
        RedisStoreConfig(
            url,
            cluster=cluster,
            namespace=namespace,
            cache_entries=1_000_000,
            cache_ttl_seconds=3600,
            socket_timeout=5,
        ),
    )
    raw = RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    raw_mget = raw.mget_nonatomic if cluster else raw.mget
    ids = np.unique(rng.integers(1, 2**64 - 1, size=n_ids, dtype=np.uint64))
    for start in range(0, n_ids, 20_000):
        plain.put_many(
            "bench",
            ids[start : start + 20_000],
            rng.normal(size=(len(ids[start : start + 20_000]), DIM)),
        )
    results = []
    for batch in BATCHES:
        requests = [zipf_ids(rng, ids, batch) for _ in range(rounds)]
        keys = [plain.keys("bench", r.tolist()) for r in requests]
        for request in requests:  # warm: every id the timed requests ask for is cached once
            cached.get_many("bench", request)
        # Interleave the three so drift on a shared machine hits them alike.
        raw_s = table_s = cached_s = 0.0
        for part in range(3):
            chunk = slice(part * rounds // 3, (part + 1) * rounds // 3)
            raw_s += time_calls(raw_mget, keys[chunk])
            table_s += time_calls(lambda r: plain.get_many("bench", r), requests[chunk])
            cached_s += time_calls(lambda r: cached.get_many("bench", r), requests[chunk])
        n = batch * rounds
        results.append(
            {
                "backend": "cluster" if cluster else "standalone",
                "batch": batch,
                "distinct_ids_per_batch": float(np.mean([len(np.unique(r)) for r in requests])),
                "raw_mget_keys_per_s": n / raw_s,
                "table_keys_per_s": n / table_s,
                "table_cached_keys_per_s": n / cached_s,
                "table_vs_raw": raw_s / table_s,
                "cached_vs_raw": raw_s / cached_s,
            }
        )
        print(
            f"{results[-1]['backend']:>10} B={batch:>4}: raw {n / raw_s:>10,.0f} keys/s, table {n / table_s:>10,.0f} "
            f"({raw_s / table_s:.2f}x), cached {n / cached_s:>12,.0f} ({raw_s / cached_s:.1f}x)",
            flush=True,
        )
    for store in (plain, cached):
        store.close()
    raw.close()
    return results


def bytes_per_id(url: str, samples: int = 2000) -> list[dict]:
    client = redis.Redis.from_url(url)
    out = []
    for dtype in ("float32", "float16"):
        for ttl in (None, 86_400.0):
            table = TableConfig("mem", DIM, dtype=dtype, ttl_seconds=ttl)
            store = RedisEmbeddingStore(
                [table],
                RedisStoreConfig(
                    url, namespace=uuid.uuid4().hex[:6], cache_entries=0, socket_timeout=5
                ),
            )
            ids = np.arange(
                10**15, 10**15 + samples, dtype=np.uint64
            )  # 16-digit ids, as real ones often are
            store.put_many("mem", ids, np.ones((samples, DIM), np.float32))
            usage = [client.memory_usage(k) for k in store.keys("mem", ids[:500].tolist())]
            out.append(
                {
                    "dtype": dtype,
                    "ttl": ttl is not None,
                    "value_bytes": DIM * (4 if dtype == "float32" else 2),
                    "memory_usage_bytes": float(np.mean(usage)),
                }
            )
            print(
                f"{dtype} ttl={ttl is not None}: {np.mean(usage):.0f} B per id (value {out[-1]['value_bytes']} B)"
            )
            store.close()
    client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer ids and rounds (under 2 minutes)"
    )
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    n_ids, rounds = (100_000, 150) if args.quick else (1_000_000, 600)
    rng = np.random.default_rng(0)
    server, cluster = RedisServer(), RedisClusterServers(3)
    try:
        lookups = measure(server.url, False, n_ids, rounds, rng) + measure(
            cluster.url, True, n_ids, rounds, rng
        )
        memory = bytes_per_id(server.url)
    finally:
        server.stop()
        cluster.stop()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "dim": DIM,
                    "ids": n_ids,
                    "rounds": rounds,
                    "machine": platform.machine(),
                    "redis": redis.__version__,
                    "lookups": lookups,
                    "memory": memory,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
