"""Prequential evaluation of online learning: replay interactions in time order against a
served artifact, predicting each event before feeding it, as production meets them.

Modes: `static` (the artifact only), `recent_history` (clicks join the users' recent items,
no training), `online_new_rows` (the trainer moves only rows the artifact lacks) and
`online` (every admitted row: the service's default). Each mode loads its own copy of the
artifact, since training changes its index and tables. `bench/online_learning.py` runs
them side by side; tests replay a small drift scenario.
"""

import numpy as np
import pandas as pd
from tqdm import tqdm

from service.artifact_tables import in_memory_store
from service.bundle import ModelBundle
from service.embeddings.recent_items import InMemoryRecentItems
from service.online.index_sync import IndexSync
from service.online.memory_streams import InMemoryEventLog, InMemoryItemUpdateFeed
from service.online.trainer import OnlineTrainer, OnlineTrainerConfig
from service.pipeline.in_process import RecommendPipeline
from service.retrieval.catalog import ItemCatalog
from service.schemas import Event, RecommendRequest

DEPTH = 50
RECOVERED = 0.9  # the last window after a shift, against the hit rate before it

# Each mode of the replay: whether clicks join the users' recent items, and the online
# trainer's configuration (None: no training).
MODES = {
    "static": (False, None),
    "recent_history": (True, None),
    "online_new_rows": (True, OnlineTrainerConfig(block_seconds=0, rows="new")),
    "online": (True, OnlineTrainerConfig(block_seconds=0)),
}


def online_parts(bundle: ModelBundle, store, config: OnlineTrainerConfig):
    """The in-process event log, recent items, trainer and index sync over `store`."""
    events, recent, feed = InMemoryEventLog(), InMemoryRecentItems(50), InMemoryItemUpdateFeed()
    trainer = OnlineTrainer(
        bundle.two_tower, bundle.features, bundle.histories, store, events, recent, feed, config
    )
    catalog = ItemCatalog.from_features(bundle.features)
    sync = IndexSync(bundle.two_tower, catalog, store, bundle.index, feed, block_seconds=0)
    return events, recent, trainer, sync


def replay(
    folder: str,
    test: pd.DataFrame,
    new_items: np.ndarray,
    mode: str,
    batch: int,
    config: OnlineTrainerConfig | None = None,
    shift: int | None = None,
) -> dict:
    """Replays `test` (interactions) in time order on the artifact in `folder`, `batch`
    events at a time: each event is predicted (its item among the user's answer of 50, and
    of 10), then fed. `new_items`: items to report apart (unknown to the artifact).
    `config` overrides the mode's trainer; `shift`: the Unix time of a drift, to report hit
    rates before it and in three windows after it."""
    pushes, trained = MODES[mode]
    trained = config or trained
    bundle = ModelBundle.load(folder)  # each mode changes its own index and table
    store = in_memory_store(bundle)
    events, recent, trainer, sync = online_parts(bundle, store, trained or OnlineTrainerConfig())
    pipeline = RecommendPipeline(bundle, store, recent=recent if pushes else None)
    ordered = test.sort_values("timestamp", kind="stable")
    users, items = ordered["user_id"].to_numpy(np.uint64), ordered["item_id"].to_numpy(np.uint64)
    places = np.full(len(users), DEPTH, dtype=np.int64)  # DEPTH: not in the answer
    new_places = 0  # answer places held by held-back items
    for start in tqdm(
        range(0, len(users), batch), desc=f"replay {mode}", unit="batch", mininterval=2
    ):
        chunk_users, chunk_items = users[start : start + batch], items[start : start + batch]
        for offset, (user, item) in enumerate(zip(chunk_users.tolist(), chunk_items.tolist())):
            answer = pipeline.recommend(RecommendRequest(user_id=user, k=DEPTH)).items
            found = [a.item_id for a in answer]
            new_places += int(np.isin(np.array(found, np.uint64), new_items).sum())
            if item in found:
                places[start + offset] = found.index(item)
        if trained is not None:
            events.append(
                [
                    Event(user_id=u, item_id=i, type="click")
                    for u, i in zip(chunk_users.tolist(), chunk_items.tolist())
                ]
            )
            while trainer.step():
                pass
            sync.step()
        elif pushes:
            recent.push(chunk_users, chunk_items)
    on_new = np.isin(items, new_items)
    figures = {
        "events": len(users),
        "events_on_new_items": int(on_new.sum()),
        "answer_share_of_new_items": round(new_places / (DEPTH * len(users)), 4),
    }
    for cut in (DEPTH, 10):
        hits = places < cut
        figures[f"hit_rate_at_{cut}"] = round(float(hits.mean()), 4)
        figures[f"hit_rate_at_{cut}_new_items"] = (
            round(float(hits[on_new].mean()), 4) if on_new.any() else None
        )
        figures[f"hit_rate_at_{cut}_other_items"] = round(float(hits[~on_new].mean()), 4)
    if shift is not None:
        hits = places < DEPTH
        after = ordered["timestamp"].to_numpy() >= shift
        before = round(float(hits[~after].mean()), 4)
        windows = [round(float(w.mean()), 4) for w in np.array_split(hits[after], 3)]
        figures["drift"] = {
            "events_after_shift": int(after.sum()),
            "hit_rate_at_50_before_shift": before,
            "hit_rate_at_50_after_shift_windows": windows,
            "recovered": windows[-1] >= RECOVERED * before,
        }
    return figures
