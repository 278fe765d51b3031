"""/v1/recommend served embedded (one process) and distributed (gateway -> retrieval and
ranking tiers over gRPC), against the raw compute one request needs, all in one run.

    python bench/serving_topology.py [--quick] [--json PATH] [--items N] [--concurrency C]
                                     [--requests N] [--artifacts PATH]

A synthetic artifact (100k items; --quick: 20k) trained by `recsys train`, one Redis holding
the embedding tables for both topologies (the local cache in front of it on, as deployed),
the online trainer off (no events are sent). Each topology runs as real processes on
loopback; one client thread, then C (default 4), send the same known users' requests
(two_tower, k=10, 200 candidates ranked) over httpx, after a warm-up; the clients share
the machine's CPUs with the servers. Also reports each process's resident memory. Raw
compute is the same requests' work with no service around it, one request at a time in
this process: one Redis MGET of the user's
row and history rows, one FAISS `Index.search` for 200 candidates, one ranker forward over
the 200 candidates' prepared features. Reports throughput, p50/p99 and how many answers
were degraded (a fallback answered).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.bundle import ModelBundle  # noqa: E402
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig  # noqa: E402
from service.probe import grpc_status  # noqa: E402
from service.testing.redis_servers import RedisServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent
K, CANDIDATES = 10, 200


def percentiles(seconds: list[float]) -> dict:
    return {q: round(float(np.percentile(seconds, int(q[1:]))) * 1e3, 3) for q in ("p50", "p99")}


def train(root: Path, items: int) -> Path:
    dataset = f"synthetic:users=3000,items={items},categories=64"
    print(f"training {dataset} into {root}", flush=True)
    subprocess.run(
        [
            str(BIN / "recsys"),
            "train",
            "--dataset",
            dataset,
            "--two-tower-epochs",
            "2",
            "--ranker-epochs",
            "2",
            "--out",
            str(root),
        ],
        check=True,
    )
    return root


class Processes:
    def __init__(self, env: dict):
        self.env, self.running, self.by_tier = env, [], {}

    def start(self, tier: str, **extra) -> dict:
        ports = {"RECSYS_HTTP_PORT": str(free_port()), "RECSYS_GRPC_PORT": str(free_port())}
        env = {**self.env, **ports, **extra}
        process = subprocess.Popen(
            [str(BIN / "recsys"), "serve", tier],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.running.append(process)
        self.by_tier[tier] = process
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{tier} exited: {process.stderr.read().decode()[-2000:]}")
            if grpc_status(int(ports["RECSYS_GRPC_PORT"])) == "SERVING":
                return ports
            time.sleep(0.5)
        raise RuntimeError(f"{tier} not serving after 300 s")

    def rss_mib(self) -> dict[str, float]:
        """Resident memory of each running tier (Linux /proc)."""
        sizes = {}
        for tier, process in self.by_tier.items():
            status = Path(f"/proc/{process.pid}/status").read_text()
            sizes[tier] = round(
                int(
                    next(
                        line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")
                    )
                )
                / 1024,
                1,
            )
        return sizes

    def stop(self) -> None:
        for process in self.running:
            process.terminate()
        for process in self.running:
            process.wait(timeout=60)
        self.running, self.by_tier = [], {}


def drive(url: str, users: np.ndarray, concurrency: int, warmup: int) -> dict:
    import httpx2

    def body(user: int) -> bytes:
        return json.dumps({"user_id": int(user), "k": K, "candidates": CANDIDATES}).encode()

    with httpx2.Client(timeout=10) as client:
        for user in users[:warmup]:
            client.post(
                url, content=body(user), headers={"content-type": "application/json"}
            ).raise_for_status()
    work = users[warmup:]
    latencies: list[float] = []
    degraded = [0]
    lock = threading.Lock()

    def client_thread(share: np.ndarray) -> None:
        mine, bad = [], 0
        with httpx2.Client(timeout=10) as client:
            for user in share:
                started = time.perf_counter()
                response = client.post(
                    url, content=body(user), headers={"content-type": "application/json"}
                )
                mine.append(time.perf_counter() - started)
                response.raise_for_status()
                bad += response.json()["degraded"]
        with lock:
            latencies.extend(mine)
            degraded[0] += bad

    threads = [
        threading.Thread(target=client_thread, args=(work[i::concurrency],))
        for i in range(concurrency)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "requests": len(work),
        "throughput_rps": round(len(work) / wall, 1),
        **percentiles(latencies),
        "degraded": degraded[0],
    }


def latency_sums(url: str) -> dict[str, float]:
    """The server's request and stage latency sums and counts, from its /metrics."""
    import httpx2

    text = httpx2.get(url.replace("/v1/recommend", "/metrics")).text
    series = {}
    for line in text.splitlines():
        if (
            line.startswith(("recsys_request_duration_seconds_", "recsys_stage_duration_seconds_"))
            and "_bucket" not in line
        ):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


def server_means_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean time inside the server per /v1/recommend and per pipeline stage between two reads."""

    def mean(metric: str, labels: str) -> float:
        total = after[f"{metric}_sum{{{labels}}}"] - before.get(f"{metric}_sum{{{labels}}}", 0.0)
        count = after[f"{metric}_count{{{labels}}}"] - before.get(
            f"{metric}_count{{{labels}}}", 0.0
        )
        return round(total / count * 1e3, 3)

    return {
        "request": mean(
            "recsys_request_duration_seconds", 'endpoint="/v1/recommend",transport="http"'
        ),
        "retrieve": mean("recsys_stage_duration_seconds", 'stage="retrieve"'),
        "rank": mean("recsys_stage_duration_seconds", 'stage="rank"'),
    }


def load_levels(url: str, users: np.ndarray, concurrency: int, warmup: int) -> dict:
    """One client (latency without queueing), then `concurrency` clients (throughput); for the
    one-client run also the mean time inside the server and in each stage (the gateway's
    stages are its calls to the tiers)."""
    before = latency_sums(url)
    levels = {"c1": drive(url, users, 1, warmup)}
    levels["c1"]["server_mean_ms"] = server_means_ms(before, latency_sums(url))
    if concurrency > 1:
        levels[f"c{concurrency}"] = drive(url, users, concurrency, warmup)
    return levels


def raw_compute(bundle: ModelBundle, redis_url: str, users: np.ndarray) -> dict:
    """The work one request needs with no service around it, one request at a time."""
    from service.pipeline.in_process import RecommendPipeline

    store = RedisEmbeddingStore(
        bundle.tables(), RedisStoreConfig(url=redis_url, namespace=bundle.namespace)
    )
    pipeline = RecommendPipeline(bundle, store)
    generator, ranker = pipeline.generator, pipeline.ranking.ranker
    prepared = []
    for user in users:  # everything that is not the three calls timed below
        history, _ = generator.history(int(user))
        vector, _ = generator.user_vector(int(user), history)
        recent = history[-generator.history_length :]
        keys = store.keys("user", [int(user)]) + store.keys("item", [int(i) for i in recent])
        scores, ids = bundle.index.index.search(vector.reshape(1, -1), CANDIDATES)
        batch = ranker.encoder.encode_request(
            int(user), ids[0].astype(np.uint64), scores[0], None, None
        )
        prepared.append((keys, vector.reshape(1, -1), batch))
    client, index, model = store.client, bundle.index.index, ranker.model
    parts = {"redis_mget": [], "faiss_search": [], "ranker_forward": []}
    totals = []
    with torch.inference_mode():
        for keys, vector, batch in prepared:
            t0 = time.perf_counter()
            client.mget(keys)
            t1 = time.perf_counter()
            index.search(vector, CANDIDATES)
            t2 = time.perf_counter()
            model(batch.categorical, batch.attributes, batch.numeric)
            t3 = time.perf_counter()
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[name].append(seconds)
            totals.append(t3 - t0)
    pipeline.close()
    return {
        "requests": len(users),
        "throughput_rps_one_thread": round(len(totals) / sum(totals), 1),
        **percentiles(totals),
        "parts_p50_ms": {name: percentiles(seconds)["p50"] for name, seconds in parts.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k items, 400 requests")
    parser.add_argument("--items", type=int)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--artifacts", type=Path, help="serve this artifact instead of training one"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    items = args.items or (20_000 if args.quick else 100_000)
    n_requests = args.requests or (400 if args.quick else 3000)
    warmup = 50
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        artifacts = args.artifacts or train(Path(scratch) / "artifacts", items)
        bundle = ModelBundle.load(artifacts)
        rng = np.random.default_rng(0)
        users = rng.choice(bundle.histories.user_ids, warmup + n_requests)
        redis = RedisServer()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
        env.update(
            RECSYS_ARTIFACTS=str(artifacts),
            RECSYS_REDIS_URL=redis.url,
            RECSYS_HOST="127.0.0.1",
            RECSYS_ONLINE_TRAINER="off",
            RECSYS_INDEX_POLL_SECONDS="0",
            RECSYS_LOG_LEVEL="WARNING",
        )
        results = {
            "items": len(bundle.index),
            "concurrency": args.concurrency,
            "cpus": os.cpu_count(),
        }
        try:
            processes = Processes(env)
            print("raw compute", flush=True)
            processes.start("retrieval")  # fills the namespace in Redis from the artifact
            processes.stop()
            results["raw_compute"] = raw_compute(bundle, redis.url, users[warmup:])
            print("embedded", flush=True)
            ports = processes.start("all")
            results["embedded"] = load_levels(
                f"http://127.0.0.1:{ports['RECSYS_HTTP_PORT']}/v1/recommend",
                users,
                args.concurrency,
                warmup,
            )
            results["rss_mib"] = processes.rss_mib()
            processes.stop()
            print("distributed", flush=True)
            retrieval, ranking = processes.start("retrieval"), processes.start("ranking")
            gateway = processes.start(
                "gateway",
                RECSYS_RETRIEVAL_ADDRESS=f"127.0.0.1:{retrieval['RECSYS_GRPC_PORT']}",
                RECSYS_RANKING_ADDRESS=f"127.0.0.1:{ranking['RECSYS_GRPC_PORT']}",
            )
            results["distributed"] = load_levels(
                f"http://127.0.0.1:{gateway['RECSYS_HTTP_PORT']}/v1/recommend",
                users,
                args.concurrency,
                warmup,
            )
            results["rss_mib"].update(processes.rss_mib())
            processes.stop()
        finally:
            processes.stop()
            redis.stop()

    raw = results["raw_compute"]
    for mode in ("embedded", "distributed"):
        for level in results[mode].values():
            level["p50_over_raw"] = round(level["p50"] / raw["p50"], 2)
    results["distributed_over_embedded"] = {
        level: {
            "throughput": round(
                results["distributed"][level]["throughput_rps"]
                / results["embedded"][level]["throughput_rps"],
                2,
            ),
            "p50": round(
                results["distributed"][level]["p50"] / results["embedded"][level]["p50"], 2
            ),
            "p99": round(
                results["distributed"][level]["p99"] / results["embedded"][level]["p99"], 2
            ),
        }
        for level in results["embedded"]
    }
    print(
        f"\n{results['items']:,} items, {results['cpus']} CPUs, client threads on the same machine"
    )
    print("| path | clients | requests/s | p50 ms | p99 ms | degraded | p50 / raw p50 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| raw compute (MGET + FAISS search + ranker forward) | 1 | {raw['throughput_rps_one_thread']} | "
        f"{raw['p50']} | {raw['p99']} | - | 1.00 |"
    )
    for mode in ("embedded", "distributed"):
        for level, r in results[mode].items():
            print(
                f"| {mode} /v1/recommend | {level[1:]} | {r['throughput_rps']} | {r['p50']} | {r['p99']} | "
                f"{r['degraded']} | {r['p50_over_raw']} |"
            )
    print(f"raw parts p50 ms: {raw['parts_p50_ms']}")
    print(f"resident memory after the run, MiB: {results['rss_mib']}")
    for mode in ("embedded", "distributed"):
        print(
            f"{mode}, one client, mean inside the server (warm-up included), ms: "
            f"{results[mode]['c1']['server_mean_ms']}"
        )
    print(f"distributed / embedded: {results['distributed_over_embedded']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
