"""What served-list logging costs the request path: p50 and p99 of the in-process
pipeline's `recommend` with the log off, to Parquet files and to a Redis stream, in one run
on one artifact (the strictest view: no HTTP time dilutes the difference).

Requests go round-robin over the three pipelines in blocks, so that drift on a noisy
machine lands on all of them alike; every list is logged (sample rate 1).

    python bench/served_log.py [--quick] [--json PATH] [--dataset synthetic|movielens-100k:PATH]
"""

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_config, bench_dataset, quality_parser
from service.bundle import ModelBundle
from service.pipeline.in_process import RecommendPipeline
from service.pipeline.served_log import ParquetServedLog, RedisServedLog, ServedListLogger
from service.schemas import RecommendRequest
from service.testing.redis_servers import RedisServer
from service.training.artifact import train_and_save

BLOCK = 50


def main() -> None:
    parser = quality_parser(__doc__)
    parser.add_argument("--requests", type=int, default=None, help="per pipeline")
    args = parser.parse_args()
    per_pipeline = args.requests or (600 if args.quick else 3000)
    data = bench_dataset(args)
    server = RedisServer()
    with tempfile.TemporaryDirectory() as scratch:
        bundle = ModelBundle.load(train_and_save(data, scratch, bench_config(args.quick)))
        client = redis.Redis.from_url(server.url)
        loggers = {
            "parquet": ServedListLogger(ParquetServedLog(Path(scratch) / "served")),
            "redis": ServedListLogger(RedisServedLog(client, "served", 1_000_000)),
        }
        pipelines = {"off": RecommendPipeline(bundle)}
        pipelines.update(
            {name: RecommendPipeline(bundle, served_log=log) for name, log in loggers.items()}
        )
        users = bundle.features.users.ids
        rng = np.random.default_rng(0)
        latencies = {name: [] for name in pipelines}
        for pipeline in pipelines.values():  # warm-up
            for user in users[:20]:
                pipeline.recommend(RecommendRequest(user_id=int(user), k=10))
        blocks = per_pipeline // BLOCK
        for _ in tqdm(range(blocks), desc="blocks", unit="block", mininterval=2):
            for name, pipeline in pipelines.items():
                for user in rng.choice(users, BLOCK):
                    started = time.perf_counter()
                    pipeline.recommend(RecommendRequest(user_id=int(user), k=10))
                    latencies[name].append(time.perf_counter() - started)
        for log in loggers.values():
            log.close()
        written = {
            "parquet": sum(1 for _ in (Path(scratch) / "served").glob("served-*.parquet")),
            "redis": client.xlen("served"),
        }
        client.close()
    server.stop()
    off = np.percentile(latencies["off"], 50)
    rows = {
        name: {
            "p50_ms": round(float(np.percentile(v, 50)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(v, 99)) * 1e3, 3),
            "p50_vs_off": round(float(np.percentile(v, 50) / off), 3),
        }
        for name, v in latencies.items()
    }
    results = {
        "dataset": data.name,
        "machine": platform.platform(),
        "quick": args.quick,
        "requests_per_pipeline": blocks * BLOCK,
        "rows": rows,
        "written": written,  # Parquet files, Redis entries
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
