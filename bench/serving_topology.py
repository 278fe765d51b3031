"""/v1/recommend served embedded (one process) and distributed (gateway -> retrieval and
ranking tiers over gRPC), against the raw compute one request needs, all in one run.

    python bench/serving_topology.py [--quick] [--json PATH] [--items N]
                                     [--concurrency C [C ...]] [--requests N] [--workers N]
                                     [--artifacts PATH]

A synthetic artifact (100k items; --quick: 20k) trained by `recsys train`, one Redis holding
the embedding tables for both topologies (the local cache in front of it on, as deployed),
the online trainer off (no events are sent), the ranker on (RECSYS_RANKER=on: every request
is ranked, whatever validation chose). Each topology runs as real processes on loopback;
1, 4 and 16 clients (--concurrency) send the same known users' requests (two_tower, k=10,
200 candidates ranked), after a warm-up: one client thread over httpx (its answers checked,
degraded ones counted), more as wrk connections for 5 s (--quick) or 15 s each (--client
httpx: Python client threads, which take a core of their own); the clients share the
machine's CPUs with the servers. The embedded service runs three times: ranking batched across
requests (RECSYS_RANK_BATCH_DELAY_MS, default 1), not batched (0), and as --workers forked
workers (default: one per CPU). Also reports each tier's memory, workers included: RSS, PSS
and USS, and what each worker past the first adds against one process.

Raw compute is the same requests' work with no service around it, one request at a time in
this process (torch and FAISS in one thread, as the servers run them): one Redis MGET of
the user's row and history rows, the user tower's forward on the decoded rows, one FAISS
`Index.search` for 200 candidates, one ranker forward (the served copy and runtime) over
the 200 candidates' prepared features. Reports throughput, p50/p99 and how many answers
were degraded (a fallback answered), the servers' CPU time over the wall time (cores
used); for one client, the mean time inside the server by stage (retrieve, rank) and
outside them (HTTP, validation, answer building).
"""

import argparse
import json
import os
import shutil
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
from service.retrieval.index import set_search_threads  # noqa: E402
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


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


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
            if grpc_status(int(ports["RECSYS_GRPC_PORT"])) == "SERVING" and self.all_ready(
                ports, int(extra.get("RECSYS_WORKERS", 1))
            ):
                return ports
            time.sleep(0.5)
        raise RuntimeError(f"{tier} not serving after 300 s")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of every running tier, workers included, so far."""
        ticks = 0
        for process in self.by_tier.values():
            for pid in (process.pid, *children(process.pid)):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def all_ready(ports: dict, workers: int) -> bool:
        """Every worker loaded (one answers health for the port as soon as it is)."""
        if workers == 1:
            return True
        import httpx2

        try:
            text = httpx2.get(f"http://127.0.0.1:{ports['RECSYS_HTTP_PORT']}/metrics").text
        except httpx2.TransportError:
            return False
        return f"recsys_ready {float(workers)}" in text

    def memory_mib(self) -> dict[str, dict[str, float]]:
        """Each running tier's memory, its workers included (Linux /proc): resident (RSS),
        proportional (PSS: shared pages split among the processes mapping them) and unique
        (USS: pages no other process maps), summed over the process tree."""
        sizes = {}
        for tier, process in self.by_tier.items():
            tree = [process.pid, *children(process.pid)]
            totals = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
            for pid in tree:
                fields = {}
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
                    name, value = line.split(":", 1)
                    fields[name] = int(value.split()[0]) / 1024
                totals["rss"] += fields["Rss"]
                totals["pss"] += fields["Pss"]
                totals["uss"] += fields["Private_Clean"] + fields["Private_Dirty"]
            sizes[tier] = {k: round(v, 1) for k, v in totals.items()} | {"processes": len(tree)}
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

    means = {
        "request": mean(
            "recsys_request_duration_seconds", 'endpoint="/v1/recommend",transport="http"'
        ),
        "retrieve": mean("recsys_stage_duration_seconds", 'stage="retrieve"'),
        "rank": mean("recsys_stage_duration_seconds", 'stage="rank"'),
    }
    means["outside_stages"] = round(means["request"] - means["retrieve"] - means["rank"], 3)
    return means


WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local users = {%s}
local sent = 0
request = function()
  sent = sent + 1
  return wrk.format(nil, nil, nil, '{"user_id": ' .. users[(sent %% #users) + 1] ..
    ', "k": %d, "candidates": %d}')
end
"""


def wrk_milliseconds(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return round(float(text[: -len(unit)]) * scale, 3)
    raise ValueError(text)


def drive_wrk(url: str, users: np.ndarray, concurrency: int, seconds: float) -> dict:
    """`concurrency` connections from wrk (C, a thread per core): a load generator that
    takes little of the CPUs the servers share with it. User ids are strings in the script:
    Lua's numbers would round ids past 2**53."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT % (",".join(f'"{int(u)}"' for u in users), K, CANDIDATES))
        script.flush()
        threads = min(concurrency, os.cpu_count() or 1)
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency"]
            + ["-s", script.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    fields = {}
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] in (["50%"], ["99%"]):
            fields["p" + parts[0][:-1]] = wrk_milliseconds(parts[1])
        elif line.startswith("Requests/sec:"):
            fields["throughput_rps"] = float(parts[1])
        elif "requests in" in line:
            fields["requests"] = int(parts[0])
        elif line.strip().startswith("Non-2xx"):
            fields["failed"] = int(parts[-1])
    return {"failed": 0, **fields, "degraded": None}


def load_levels(
    url: str,
    users: np.ndarray,
    levels: list[int],
    warmup: int,
    wrk_seconds: float | None,
    cpu_seconds,
) -> dict:
    """Each client count in turn: one client (latency without queueing), more (throughput);
    for the one-client run also the mean time inside the server and in each stage (the
    gateway's stages are its calls to the tiers). With `wrk_seconds`, wrk drives the levels
    past one client (the Python client would take a core of its own from the servers).
    `server_cores`: the servers' CPU time over the level's wall time (`cpu_seconds()`)."""
    results = {}
    for clients in levels:
        before, cpu, started = latency_sums(url), cpu_seconds(), time.perf_counter()
        if clients > 1 and wrk_seconds:
            results[f"c{clients}"] = drive_wrk(url, users, clients, wrk_seconds)
        else:
            results[f"c{clients}"] = drive(url, users, clients, warmup)
        results[f"c{clients}"]["server_cores"] = round(
            (cpu_seconds() - cpu) / (time.perf_counter() - started), 2
        )
        if clients == 1:
            results["c1"]["server_mean_ms"] = server_means_ms(before, latency_sums(url))
    return results


def raw_compute(bundle: ModelBundle, redis_url: str, users: np.ndarray) -> dict:
    """The work one request needs with no service around it, one request at a time."""
    from service.pipeline.in_process import RecommendPipeline

    store = RedisEmbeddingStore(
        bundle.tables(), RedisStoreConfig(url=redis_url, namespace=bundle.namespace)
    )
    pipeline = RecommendPipeline(bundle, store)
    generator, ranker = pipeline.generator, pipeline.ranking.ranker
    prepared = []
    for user in users:  # everything that is not the four calls timed below
        history, _ = generator.history(int(user))
        vector, _ = generator.user_vector(int(user), history)
        recent = history[-generator.history_length :]
        keys = store.keys("user", [int(user)]) + store.keys("item", [int(i) for i in recent])
        rows = store.get_many("user", [int(user)]), store.get_many("item", recent)
        tower_inputs = (rows[0].vectors, rows[1].vectors[None], rows[1].found[None])
        scores, ids = bundle.index.index.search(vector.reshape(1, -1), CANDIDATES)
        batch = ranker.encoder.encode_request(
            int(user), ids[0].astype(np.uint64), scores[0], None, None
        )
        prepared.append((keys, tower_inputs, vector.reshape(1, -1), batch))
    client, index, forward = store.client, bundle.index.index, ranker.forward
    user_tower = generator.user_tower
    parts = {"redis_mget": [], "user_tower": [], "faiss_search": [], "ranker_forward": []}
    totals = []
    with torch.inference_mode():
        for keys, tower_inputs, vector, batch in prepared:
            t0 = time.perf_counter()
            client.mget(keys)
            t1 = time.perf_counter()
            user_tower(*tower_inputs)
            t2 = time.perf_counter()
            index.search(vector, CANDIDATES)
            t3 = time.perf_counter()
            forward(batch)
            t4 = time.perf_counter()
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[name].append(seconds)
            totals.append(t4 - t0)
    pipeline.close()
    return {
        "requests": len(users),
        "throughput_rps_one_thread": round(len(totals) / sum(totals), 1),
        **percentiles(totals),
        "parts_p50_ms": {name: percentiles(seconds)["p50"] for name, seconds in parts.items()},
    }


WORKERS_MODE = "embedded_workers"
MODES = ("embedded", "embedded_unbatched", WORKERS_MODE, "distributed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k items, 400 requests a level")
    parser.add_argument("--items", type=int)
    parser.add_argument("--requests", type=int)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client counts (1 first)"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="workers of the workers run"
    )
    parser.add_argument(
        "--artifacts", type=Path, help="serve this artifact instead of training one"
    )
    parser.add_argument(
        "--client",
        choices=("wrk", "httpx"),
        default="wrk" if shutil.which("wrk") else "httpx",
        help="what drives the levels past one client (default: wrk where installed)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    items = args.items or (20_000 if args.quick else 100_000)
    n_requests = args.requests or (400 if args.quick else 3000)
    levels = sorted({1, *args.concurrency})
    wrk_seconds = (5 if args.quick else 15) if args.client == "wrk" else None
    warmup = 50
    torch.set_num_threads(1)  # raw compute in one thread, as each server is configured
    set_search_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        artifacts = args.artifacts or train(Path(scratch) / "artifacts", items)
        bundle = ModelBundle.load(artifacts, ranker_variant="auto")  # as the service serves it
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
            RECSYS_RANKER="on",
        )
        results = {
            "items": len(bundle.index),
            "concurrency": levels,
            "cpus": os.cpu_count(),
            "ranker_variant": bundle.ranker_variant,
            "workers": args.workers,
            "client": args.client,
            "memory_mib": {},
        }
        processes = Processes(env)
        try:
            print("raw compute", flush=True)
            processes.start("retrieval")  # fills the namespace in Redis from the artifact
            processes.stop()
            results["raw_compute"] = raw_compute(bundle, redis.url, users[warmup:])
            for mode, extra in (
                ("embedded", {}),
                ("embedded_unbatched", {"RECSYS_RANK_BATCH_DELAY_MS": "0"}),
                (WORKERS_MODE, {"RECSYS_WORKERS": str(args.workers)}),
            ):
                print(mode, flush=True)
                ports = processes.start("all", **extra)
                results[mode] = load_levels(
                    f"http://127.0.0.1:{ports['RECSYS_HTTP_PORT']}/v1/recommend",
                    users,
                    levels,
                    warmup,
                    wrk_seconds,
                    processes.cpu_seconds,
                )
                results["memory_mib"][mode] = processes.memory_mib()["all"]
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
                levels,
                warmup,
                wrk_seconds,
                processes.cpu_seconds,
            )
            results["memory_mib"].update(processes.memory_mib())
        finally:
            processes.stop()
            redis.stop()

    memory = results["memory_mib"]
    results["rss_mib"] = {
        tier: memory[mode]["rss"]
        for tier, mode in (
            ("all", "embedded"),
            ("retrieval", "retrieval"),
            ("ranking", "ranking"),
            ("gateway", "gateway"),
        )
    }
    raw = results["raw_compute"]
    for mode in MODES:
        for level in results[mode].values():
            level["p50_over_raw"] = round(level["p50"] / raw["p50"], 2)
    top = f"c{levels[-1]}"
    # Saturation throughput against what the cores could do at the raw single-thread rate.
    results["saturation_over_cores_x_raw"] = {
        mode: round(
            results[mode][top]["throughput_rps"]
            / (results["cpus"] * raw["throughput_rps_one_thread"]),
            3,
        )
        for mode in ("embedded", WORKERS_MODE)
    }
    # What each worker past the first adds, against one embedded process, by PSS and USS.
    one, several = results["memory_mib"]["embedded"], results["memory_mib"][WORKERS_MODE]
    results["memory_per_extra_worker_over_one_process"] = {
        kind: round((several[kind] - one[kind]) / max(args.workers - 1, 1) / one[kind], 3)
        for kind in ("pss", "uss")
    }
    results["distributed_over_embedded"] = {
        level: {
            metric: round(results["distributed"][level][key] / results["embedded"][level][key], 2)
            for metric, key in (("throughput", "throughput_rps"), ("p50", "p50"), ("p99", "p99"))
        }
        for level in results["embedded"]
    }
    results["batched_over_unbatched"] = {
        level: {
            metric: round(
                results["embedded"][level][key] / results["embedded_unbatched"][level][key], 2
            )
            for metric, key in (("throughput", "throughput_rps"), ("p99", "p99"))
        }
        for level in results["embedded"]
    }
    print(
        f"\n{results['items']:,} items, {results['cpus']} CPUs, client threads on the same "
        f"machine, ranker {results['ranker_variant']}"
    )
    print(
        "| path | clients | requests/s | p50 ms | p99 ms | degraded | failed | server cores "
        "| p50 / raw p50 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| raw compute (MGET + user tower + FAISS search + ranker forward) | 1 | "
        f"{raw['throughput_rps_one_thread']} | {raw['p50']} | {raw['p99']} | - | - | 1 | 1.00 |"
    )
    for mode in MODES:
        for level, r in results[mode].items():
            print(
                f"| {mode} /v1/recommend | {level[1:]} | {r['throughput_rps']} | {r['p50']} | "
                f"{r['p99']} | {'-' if r['degraded'] is None else r['degraded']} | "
                f"{r.get('failed', 0)} | {r['server_cores']} | {r['p50_over_raw']} |"
            )
    print(f"raw parts p50 ms: {raw['parts_p50_ms']}")
    print(f"memory after the run, MiB: {results['memory_mib']}")
    print(
        f"each extra worker adds, as a share of one process: "
        f"{results['memory_per_extra_worker_over_one_process']}"
    )
    for mode in MODES:
        print(
            f"{mode}, one client, mean inside the server (warm-up included), ms: "
            f"{results[mode]['c1']['server_mean_ms']}"
        )
    print(f"throughput at {top} / (cpus x raw): {results['saturation_over_cores_x_raw']}")
    print(f"distributed / embedded: {results['distributed_over_embedded']}")
    print(f"batched / unbatched ranking (embedded): {results['batched_over_unbatched']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
