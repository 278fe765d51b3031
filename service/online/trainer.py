"""Online training (Monolith's real-time half, scaled down): events in, id vectors out.

For each batch read from the event log:
1. every event counts toward its user's and item's admission (the tables' frequency filter);
2. positive events (click, purchase) of admitted users and items take `steps` SGD steps of
   the two-tower's sampled softmax, both ways (user to item against the batch's other items
   and uniformly sampled catalog items; item to user against the batch's other users and
   sampled artifact users), on the id vectors of rows the artifact did not train (new items,
   catalog items without interactions, new users; artifact rows too with `train_artifact_rows`); the towers' dense layers stay
   as trained (Monolith also syncs dense parameters far less often than sparse ones);
3. the new vectors are written to the embedding table with fresh TTLs, the positive items
   appended to their users' recent items and their clusters to the users' interests
   (kNN-Embed), the rewritten items announced on the update feed
   (every serving process re-embeds them into its index), and only then are the events acked.

A failure before the ack leaves the batch pending: the same or another trainer gets it
again (at least once). Brand-new item ids (no catalog attributes) start from the table's
default vector and are embedded from their id vector alone.
"""

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from service.embeddings.artifact_tables import ITEM_TABLE, USER_TABLE
from service.embeddings.store import EmbeddingStore, Lookup
from service.features import FeatureSpace
from service.history import UserHistories
from service.metrics import EVENTS_BACKLOG, EVENTS_PROCESSED, FRESHNESS, ONLINE_ROWS_WRITTEN, ONLINE_UPDATE_DELAY
from service.online.interests import InterestUpdater
from service.online.recent import RecentItems
from service.online.streams import EventLog, ItemUpdateFeed, LoggedEvent
from service.retrieval.two_tower import TwoTower
from service.schemas import POSITIVE_EVENT_TYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineTrainerConfig:
    batch_events: int = 512  # events read per batch
    learning_rate: float = 0.05
    steps: int = 5  # SGD steps per batch
    negatives: int = 256  # uniformly sampled catalog items per batch
    train_artifact_rows: bool = False  # also move the vectors of users and items the artifact trained
    block_seconds: float = 1.0  # how long a read waits for new events
    history_length: int = 50
    seed: int = 0


class OnlineTrainer:
    def __init__(
        self,
        two_tower: TwoTower,
        features: FeatureSpace,
        histories: UserHistories,
        store: EmbeddingStore,
        events: EventLog,
        recent: RecentItems,
        updates: ItemUpdateFeed,
        config: OnlineTrainerConfig = OnlineTrainerConfig(),
        consumer: str = "trainer",
        interests: InterestUpdater | None = None,
    ):
        self.two_tower = two_tower
        self.features = features
        self.histories = histories
        self.store = store
        self.events = events
        self.recent = recent
        self.updates = updates
        self.config = config
        self.consumer = consumer
        self.interests = interests
        self.temperature = two_tower.config.temperature
        self._rng = np.random.default_rng(config.seed)
        self._last_update = time.time()
        self.backlog = 0
        self._user_negatives: torch.Tensor | None = None
        FRESHNESS.labels("trainer").set_function(lambda: time.time() - self._last_update)

    def step(self) -> int:
        """Read one batch, process it, ack it; returns how many events it held."""
        batch = self.events.read(self.consumer, self.config.batch_events, self.config.block_seconds)
        if batch:
            self.process(batch)
            self.events.ack([e.entry_id for e in batch])
            for event in batch:
                EVENTS_PROCESSED.labels(event.type).inc()
        self.backlog = self.events.backlog()
        EVENTS_BACKLOG.set(self.backlog)
        return len(batch)

    def run(self, stop: threading.Event, retry_seconds: float = 1.0) -> None:
        """Process batches until `stop` is set; a failed batch is retried (it stays pending)."""
        processed, since = 0, time.monotonic()
        while not stop.is_set():
            try:
                processed += self.step()
            except Exception:
                log.exception("online training batch failed; its events stay pending and are read again")
                stop.wait(retry_seconds)
            if time.monotonic() - since >= 30:
                log.info("online trainer: %.1f events/s, backlog %d", processed / (time.monotonic() - since), self.backlog)
                processed, since = 0, time.monotonic()

    def process(self, batch: list[LoggedEvent]) -> None:
        users = np.array([e.user_id for e in batch], dtype=np.uint64)
        items = np.array([e.item_id for e in batch], dtype=np.uint64)
        positive = np.array([e.type in POSITIVE_EVENT_TYPES for e in batch], dtype=bool)
        trainable = positive & self.store.record(USER_TABLE, users) & self.store.record(ITEM_TABLE, items)
        if trainable.any():
            self._train(users[trainable], items[trainable])
        if positive.any():
            if self.interests is not None:
                self.interests.update(users[positive], items[positive])
            self.recent.push(users[positive], items[positive])
        if trainable.any():
            self.updates.publish(np.unique(items[trainable]))
            now = time.time()
            self._last_update = now
            for event in batch:
                ONLINE_UPDATE_DELAY.observe(max(0.0, now - event.appended_at))

    def _pooled_history(self, user_ids: np.ndarray) -> np.ndarray:
        """Mean item-id vector of each user's latest items (artifact history, then recent)."""
        length = self.config.history_length
        recent = self.recent.get_many(user_ids)
        histories = [np.concatenate([self.histories.get(u), r])[-length:] for u, r in zip(user_ids.tolist(), recent)]
        everything = np.unique(np.concatenate(histories)) if histories else np.empty(0, np.uint64)
        pooled = np.zeros((len(user_ids), self.two_tower.config.id_dim), dtype=np.float32)
        if not len(everything):
            return pooled
        lookup = self._lookup(ITEM_TABLE, everything)
        for row, history in enumerate(histories):
            at = np.searchsorted(everything, history)
            at = at[lookup.found[at]]
            if len(at):
                pooled[row] = lookup.vectors[at].mean(0)
        return pooled

    def _sampled_users(self) -> torch.Tensor:
        """User-tower outputs of random artifact users, the negatives of the item side; made
        once, from the vectors the table held then."""
        if self._user_negatives is None:
            known = self.features.users.ids
            sample = self._rng.choice(known, min(self.config.negatives, len(known)), replace=False)
            with torch.no_grad():
                self._user_negatives = self.two_tower.user_tower(
                    torch.from_numpy(self._vectors(USER_TABLE, sample)),
                    torch.from_numpy(self._pooled_history(sample)),
                )
        return self._user_negatives

    def _lookup(self, table: str, ids: np.ndarray) -> Lookup:
        """Rows as the table holds them; a failed read raises, so defaults are never trained
        on and written back over real rows."""
        lookup = self.store.get_many(table, ids)
        if lookup.degraded:
            raise ConnectionError(f"embedding table {table!r} unavailable")
        return lookup

    def _vectors(self, table: str, ids: np.ndarray) -> np.ndarray:
        return self._lookup(table, ids).vectors

    def _attributes(self, item_ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.features.item_attributes[self.features.items.rows(item_ids)])

    def _train(self, pair_users: np.ndarray, pair_items: np.ndarray) -> None:
        user_ids, user_of_pair = np.unique(pair_users, return_inverse=True)
        item_ids, item_of_pair = np.unique(pair_items, return_inverse=True)
        user_vectors = torch.from_numpy(self._vectors(USER_TABLE, user_ids)).requires_grad_()
        item_vectors = torch.from_numpy(self._vectors(ITEM_TABLE, item_ids)).requires_grad_()
        pooled = torch.from_numpy(self._pooled_history(user_ids))
        attributes = self._attributes(item_ids)

        catalog = self.features.items.ids
        sampled = np.setdiff1d(self._rng.choice(catalog, min(self.config.negatives, len(catalog)), replace=False), item_ids)
        with torch.no_grad():
            negatives = self.two_tower.item_tower_from_vectors(
                torch.from_numpy(self._vectors(ITEM_TABLE, sampled)), self._attributes(sampled)
            )
        # A batch item the same user also clicked is not a negative for that user's other pairs.
        clicked = np.zeros((len(user_ids), len(item_ids)), dtype=bool)
        clicked[user_of_pair, item_of_pair] = True
        accidental = clicked[user_of_pair]
        accidental[np.arange(len(pair_users)), item_of_pair] = False
        masked = torch.from_numpy(np.pad(accidental, ((0, 0), (0, len(sampled)))))
        target = torch.from_numpy(item_of_pair.astype(np.int64))

        # And the other way: a pair's item should be closer to its user than to other users.
        other_users = self._sampled_users()
        clicked_by = torch.from_numpy(np.pad(clicked.T[item_of_pair], ((0, 0), (0, len(other_users)))))
        clicked_by[np.arange(len(pair_users)), user_of_pair] = False
        user_target = torch.from_numpy(user_of_pair.astype(np.int64))

        # Rows the artifact trained stay as they are unless asked: on the benchmark's replay,
        # moving them lowered hit rates (bench/online_learning.py), while rows the artifact
        # lacks (new items, new users) have nothing better to start from.
        user_rate = torch.full((len(user_ids), 1), self.config.learning_rate)
        item_rate = torch.full((len(item_ids), 1), self.config.learning_rate)
        if not self.config.train_artifact_rows:
            user_rate[torch.from_numpy(self.features.users.rows(user_ids) > 0)] = 0.0
            # Catalog items with no training interaction count as new: the artifact only knows their attributes.
            item_rate[torch.from_numpy(self.features.item_counts[self.features.items.rows(item_ids)] > 0)] = 0.0
        for _ in range(self.config.steps):
            users = self.two_tower.user_tower(user_vectors, pooled)
            user = users[torch.from_numpy(user_of_pair)]
            items = self.two_tower.item_tower_from_vectors(item_vectors, attributes)
            item = items[torch.from_numpy(item_of_pair)]
            logits = (user @ torch.cat([items, negatives]).T / self.temperature).masked_fill(masked, float("-inf"))
            user_logits = (item @ torch.cat([users, other_users]).T / self.temperature).masked_fill(clicked_by, float("-inf"))
            loss = F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(user_logits, user_target, reduction="sum")
            user_grad, item_grad = torch.autograd.grad(loss, [user_vectors, item_vectors])
            with torch.no_grad():
                user_vectors -= user_rate * user_grad
                item_vectors -= item_rate * item_grad

        self.store.put_many(USER_TABLE, user_ids, user_vectors.detach().numpy())
        self.store.put_many(ITEM_TABLE, item_ids, item_vectors.detach().numpy())
        ONLINE_ROWS_WRITTEN.labels(USER_TABLE).inc(len(user_ids))
        ONLINE_ROWS_WRITTEN.labels(ITEM_TABLE).inc(len(item_ids))
