"""Online learning, measured three ways, all in one run:

1. Quality (prequential replay): train as `recsys train` does on each user's past (temporal
   split) with a tenth of the catalog held back entirely (items that appear only later),
   then replay the held-out interactions in time order in batches; each event is first
   predicted (is its item in the user's answer of 50, of 10: the full pipeline, ranker
   included where validation serves it) and then fed to the service. Side by side: static
   (the artifact only), recent history (clicks join the user's history and exclusions, no
   training), online on new rows only (the trainer moves only rows the artifact lacks), and
   online (every admitted row: the default). Also the share of answer places that went to
   held-back items. `--drift`: the drift scenario (`service.data.synthetic`), with hit rates
   before the shift and in three windows after it.
2. Freshness on Redis: a click on a brand-new item, appended to the Redis event log, until
   the serving index holds the item (trainer and index sync as the service runs them).
3. Throughput: events appended per second (the log's MULTI/EXEC of XADDs vs raw pipelined
   XADD, same run) and events trained per second (in-process table vs Redis).

    python bench/online_learning.py [--quick] [--json PATH] [--dataset synthetic|movielens-100k:PATH] [--drift]
"""

import argparse
import json
import platform
import tempfile
import threading
import time
import uuid
from dataclasses import replace

import numpy as np
import redis

from service.artifact_tables import in_memory_store, load_artifact
from service.bundle import ModelBundle
from service.data.files import load_dataset, synthetic_config
from service.data.schema import Dataset
from service.data.split import temporal_split
from service.embeddings.recent_items import InMemoryRecentItems, RedisRecentItems
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig, connect
from service.evaluation import train_validated
from service.online.index_sync import IndexSync
from service.online.memory_streams import InMemoryEventLog, InMemoryItemUpdateFeed
from service.online.redis_streams import RedisEventLog, RedisItemUpdateFeed
from service.online.trainer import OnlineTrainer, OnlineTrainerConfig
from service.prequential import MODES, replay
from service.retrieval.catalog import ItemCatalog
from service.schemas import Event
from service.testing.redis_servers import RedisServer
from service.training.artifact import TrainConfig, train_and_save

QUICK_SET = "synthetic:users=500,items=800,categories=16"
DRIFT = "drift_users=0.33,drift_items={items}"


def train(dataset, quick: bool, root: str) -> str:
    """As `recsys train` does: validation chooses the user tower, the item-to-item share,
    kNN-Embed's knobs and whether the ranker serves; `--quick`: the mean tower, shorter
    training, no validation."""
    config = TrainConfig()
    if quick:
        config = replace(
            config,
            two_tower=replace(config.two_tower, epochs=4),
            ranker=replace(config.ranker, epochs=1),
        )
        return str(train_and_save(dataset, root, config))
    return str(train_validated(dataset, root, config, ("mean", "sequence")))


def freshness_on_redis(folder: str, rounds: int) -> dict:
    """Seconds from appending a click on a new item to the serving index holding it."""
    server = RedisServer("--appendonly", "yes")
    try:
        bundle = ModelBundle.load(folder)
        namespace = uuid.uuid4().hex[:6]
        store = RedisEmbeddingStore(
            bundle.tables(), RedisStoreConfig(server.url, namespace=namespace, socket_timeout=5)
        )
        load_artifact(store, bundle, progress=False)
        client = connect(RedisStoreConfig(server.url, socket_timeout=5))
        log = RedisEventLog(client, "bench-events", f"trainer.{namespace}")
        log.ensure_group()
        feed = RedisItemUpdateFeed(client, namespace)
        recent = RedisRecentItems(client, namespace, 50)
        trainer = OnlineTrainer(
            bundle.two_tower,
            bundle.features,
            bundle.histories,
            store,
            log,
            recent,
            feed,
            OnlineTrainerConfig(block_seconds=1.0),
        )
        serving_client = connect(RedisStoreConfig(server.url, socket_timeout=5))
        sync = IndexSync(
            bundle.two_tower,
            ItemCatalog.from_features(bundle.features),
            store,
            bundle.index,
            RedisItemUpdateFeed(serving_client, namespace),
            block_seconds=1.0,
        )
        stop = threading.Event()
        threads = [
            threading.Thread(target=part.run, args=(stop,), daemon=True) for part in (trainer, sync)
        ]
        for thread in threads:
            thread.start()
        users = bundle.features.users.ids
        delays = []
        for n in range(rounds):
            before = len(bundle.index)
            started = time.perf_counter()
            log.append([Event(user_id=int(users[n % len(users)]), item_id=2**63 + n, type="click")])
            while len(bundle.index) == before:
                time.sleep(0.001)
            delays.append(time.perf_counter() - started)
        stop.set()
        for thread in threads:
            thread.join()
        client.close()
        serving_client.close()
        store.close()
        return {
            "rounds": rounds,
            "p50_s": round(float(np.median(delays)), 4),
            "p95_s": round(float(np.percentile(delays, 95)), 4),
            "max_s": round(float(np.max(delays)), 4),
        }
    finally:
        server.stop()


def throughput(folder: str, n_events: int) -> dict:
    server = RedisServer()
    try:
        bundle = ModelBundle.load(folder)
        rng = np.random.default_rng(0)
        users, items = bundle.features.users.ids, bundle.features.items.ids
        batches = [
            [
                Event(user_id=int(u), item_id=int(i), type="click")
                for u, i in zip(rng.choice(users, 100), rng.choice(items, 100))
            ]
            for _ in range(n_events // 100)
        ]
        client = redis.Redis.from_url(server.url)
        log = RedisEventLog(client, "append-events", "g")
        log.ensure_group()

        def raw(batch):
            pipe = client.pipeline(transaction=False)
            for e in batch:
                pipe.xadd(
                    "raw-events",
                    {
                        "user": str(e.user_id),
                        "item": str(e.item_id),
                        "type": e.type,
                        "ts": repr(time.time()),
                    },
                )
            pipe.execute()

        timings = {"log": 0.0, "raw": 0.0}
        for part in range(3):  # interleaved, so drift hits both alike
            for name, call in (("raw", raw), ("log", log.append)):
                started = time.perf_counter()
                for batch in batches[part::3]:
                    call(batch)
                timings[name] += time.perf_counter() - started
        appended = {name: round(n_events / seconds) for name, seconds in timings.items()}

        trained = {}
        for backend in ("memory", "redis"):
            bundle = ModelBundle.load(folder)
            if backend == "memory":
                store = in_memory_store(bundle)
                events, recent = InMemoryEventLog(), InMemoryRecentItems(50)
            else:
                namespace = uuid.uuid4().hex[:6]
                store = RedisEmbeddingStore(
                    bundle.tables(),
                    RedisStoreConfig(
                        server.url, namespace=namespace, socket_timeout=5, cache_entries=0
                    ),
                )
                load_artifact(store, bundle, progress=False)
                events = RedisEventLog(client, f"train-events-{namespace}", "g")
                events.ensure_group()
                recent = RedisRecentItems(client, namespace, 50)
            trainer = OnlineTrainer(
                bundle.two_tower,
                bundle.features,
                bundle.histories,
                store,
                events,
                recent,
                InMemoryItemUpdateFeed(),
                OnlineTrainerConfig(block_seconds=0),
            )
            for batch in batches:
                events.append(batch)
            started = time.perf_counter()
            while trainer.step():
                pass
            trained[backend] = round(n_events / (time.perf_counter() - started))
        client.close()
        return {
            "appended_per_s": appended,
            "log_vs_raw_xadd": round(appended["log"] / appended["raw"], 3),
            "trained_per_s": trained,
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small synthetic set, short training (under 2 minutes)",
    )
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--dataset", default=None, help="default: synthetic (small with --quick)")
    parser.add_argument(
        "--drift",
        action="store_true",
        help="the drift scenario on the default synthetic set: at 90%% of its time span a third "
        "of users swap an interest and new items arrive (a tenth of the catalog); the replay "
        "reports hit rates before the shift and in three windows after it",
    )
    args = parser.parse_args()
    name = args.dataset or (QUICK_SET if args.quick else "synthetic:")
    if args.drift:
        name += ("," if args.quick else "") + DRIFT.format(items=80 if args.quick else 300)
    data = load_dataset(name)
    train_part, test = temporal_split(data, 0.2)
    # A tenth of the catalog arrives only in the replay: unknown to the artifact, like new
    # items; so do the items a drift brings.
    catalog = data.items["item_id"].to_numpy(np.uint64)
    new_items = np.random.default_rng(0).choice(catalog, size=len(catalog) // 10, replace=False)
    shift = None
    if name.startswith("synthetic") and (config := synthetic_config(name)).drifts:
        shift = config.drift_time
        new_items = np.union1d(new_items, catalog[config.items :])
    interactions, items = train_part.interactions, train_part.items
    train_part = Dataset(
        train_part.name,
        interactions[~interactions["item_id"].isin(new_items)].reset_index(drop=True),
        items[~items["item_id"].isin(new_items)].reset_index(drop=True),
    )
    results = {"dataset": data.name, "machine": platform.platform(), "quick": args.quick}
    with tempfile.TemporaryDirectory() as scratch:
        folder = train(train_part, args.quick, scratch)
        validation = ModelBundle.load(folder).manifest.get("validation") or {}
        results["validation_choices"] = validation.get("choices")
        results["prequential"] = {
            mode: replay(folder, test, new_items, mode, batch=256, shift=shift) for mode in MODES
        }
        if shift is None:  # the system's figures, not the data's: once is enough
            results["freshness_redis"] = freshness_on_redis(folder, 10 if args.quick else 50)
            results["throughput"] = throughput(folder, 2000 if args.quick else 10_000)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
