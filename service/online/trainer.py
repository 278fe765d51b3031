"""Online training (Monolith's real-time half, scaled down): events in, id vectors out.

For each batch read from the event log:
1. every event counts toward its user's and item's admission (the tables' frequency filter);
2. positive events (click, purchase) of admitted users and items take `steps` SGD steps of
   the two-tower's sampled softmax, both ways (user to item against the batch's other items
   and uniformly sampled catalog items; item to user against the batch's other users and
   sampled artifact users), on the id vectors of rows the artifact did not train (new items,
   catalog items without interactions, new users; artifact rows too with
   `train_artifact_rows`); the towers' dense layers stay as trained (Monolith also syncs
   dense parameters far less often than sparse ones);
3. what the batch will write is recorded first (`service.online.journal`), then the
   occurrences are counted, the new vectors written to the embedding table with fresh TTLs,
   the users' interests (kNN-Embed) rewritten, the positive items appended to their users'
   recent items, the rewritten items announced on the update feed (every serving process
   re-embeds them into its index), and only then are the events acked and the record dropped.

A failure before the ack leaves the batch pending: the same or another trainer gets it
again, and finds the record, so it writes what the first pass computed instead of training
again from rows that pass may already have rewritten. The vectors end as if the batch had
been processed once. Sampling is seeded by the batch's first entry id, so a batch computed
twice (a crash before its record was saved) computes the same. Brand-new item ids (no
catalog attributes) start from the table's default vector and are embedded from their id
vector alone.
"""

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from service.data.feature_space import FeatureSpace
from service.data.histories import UserHistories
from service.embeddings.recent_items import RecentItems
from service.embeddings.store import EmbeddingStore, Lookup
from service.embeddings.tables import INTEREST_TABLE, ITEM_TABLE, USER_TABLE
from service.metrics import (
    EVENTS_BACKLOG,
    EVENTS_PROCESSED,
    FRESHNESS,
    ONLINE_ROWS_WRITTEN,
    ONLINE_UPDATE_DELAY,
)
from service.online.interests import InterestUpdater, padded_histories
from service.online.journal import BatchOutcome
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
    train_artifact_rows: bool = (
        False  # also move the vectors of users and items the artifact trained
    )
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
        self.journal = events.journal()
        self.temperature = two_tower.config.temperature
        self._last_update = time.time()
        self.backlog = 0
        self._user_negatives: torch.Tensor | None = None
        FRESHNESS.labels("trainer").set_function(lambda: time.time() - self._last_update)

    def step(self) -> int:
        """Read one batch, process it, ack it; returns how many events it held."""
        batch = self.events.read(self.consumer, self.config.batch_events, self.config.block_seconds)
        if batch:
            entries = [e.entry_id for e in batch]
            outcome, done = self.journal.load(self.consumer, entries)
            if outcome is None:  # a batch seen for the first time (or whose record was never saved)
                outcome, done = self.compute(batch), set()
                self.journal.save(self.consumer, outcome)
            self.write(outcome, done)
            self.events.ack(entries)
            self.journal.clear(self.consumer)
            for event in batch:
                EVENTS_PROCESSED.labels(event.type).inc()
            if len(
                outcome.published
            ):  # the batch changed vectors: how long its events took to land
                now = time.time()
                for event in batch:
                    ONLINE_UPDATE_DELAY.observe(max(0.0, now - event.appended_at))
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
                log.exception(
                    "online training batch failed; its events stay pending and are read again"
                )
                stop.wait(retry_seconds)
            if time.monotonic() - since >= 30:
                log.info(
                    "online trainer: %.1f events/s, backlog %d",
                    processed / (time.monotonic() - since),
                    self.backlog,
                )
                processed, since = 0, time.monotonic()

    def compute(self, batch: list[LoggedEvent]) -> BatchOutcome:
        """What `batch` writes, from the tables as they are; writes nothing."""
        seed = int.from_bytes(hashlib.sha256(batch[0].entry_id.encode()).digest()[:8], "little")
        rng = np.random.default_rng([self.config.seed, seed])
        users = np.array([e.user_id for e in batch], dtype=np.uint64)
        items = np.array([e.item_id for e in batch], dtype=np.uint64)
        positive = np.array([e.type in POSITIVE_EVENT_TYPES for e in batch], dtype=bool)
        trainable = (
            positive
            & self.store.admission(USER_TABLE, users, rng)
            & self.store.admission(ITEM_TABLE, items, rng)
        )
        dim = self.two_tower.config.id_dim
        none, no_vectors = np.empty(0, np.uint64), np.empty((0, dim), np.float32)
        user_ids, user_vectors, item_ids, item_vectors = none, no_vectors, none, no_vectors
        if trainable.any():
            user_ids, user_vectors, item_ids, item_vectors = self._train(
                users[trainable], items[trainable], rng
            )
        interest_users, interest_rows = none, np.empty((0, 0), np.float32)
        if positive.any() and self.interests is not None:
            interest_users, interest_rows = self.interests.rows_after(
                users[positive], items[positive], (item_ids, item_vectors)
            )
        return BatchOutcome(
            [e.entry_id for e in batch],
            users,
            items,
            user_ids,
            user_vectors,
            item_ids,
            item_vectors,
            interest_users,
            interest_rows,
            users[positive],
            items[positive],
            np.unique(items[trainable]),
        )

    def write(self, outcome: BatchOutcome, done: set[str]) -> None:
        """Apply a batch's outcome. Rows are set to the recorded values (idempotent); the
        steps that add are skipped when the record marks them done."""
        for table, ids in ((USER_TABLE, outcome.count_users), (ITEM_TABLE, outcome.count_items)):
            if f"counted_{table}" not in done:
                self.store.add_counts(table, ids)
                self.journal.mark(self.consumer, f"counted_{table}")
        for table, ids, vectors in (
            (USER_TABLE, outcome.user_ids, outcome.user_vectors),
            (ITEM_TABLE, outcome.item_ids, outcome.item_vectors),
            (INTEREST_TABLE, outcome.interest_users, outcome.interest_rows),
        ):
            if len(ids):
                self.store.put_many(table, ids, vectors)
                ONLINE_ROWS_WRITTEN.labels(table).inc(len(ids))
        if len(outcome.recent_users) and "pushed" not in done:
            self.recent.push(outcome.recent_users, outcome.recent_items)
            self.journal.mark(self.consumer, "pushed")
        if len(outcome.published):
            self.updates.publish(outcome.published)
            self._last_update = time.time()

    def _histories(
        self, user_ids: np.ndarray, with_recent: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of each user's latest items (artifact history, then recent) as the user
        tower takes them: [B, L, d] left-padded, and where a row exists."""
        length = self.config.history_length
        recent = (
            self.recent.get_many(user_ids)
            if with_recent
            else [np.empty(0, np.uint64)] * len(user_ids)
        )
        histories = [
            np.concatenate([self.histories.get(u), r])[-length:]
            for u, r in zip(user_ids.tolist(), recent)
        ]
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        flat = np.concatenate(histories) if histories else np.empty(0, np.uint64)
        d = self.two_tower.config.id_dim
        lookup = (
            self._lookup(ITEM_TABLE, flat)
            if len(flat)
            else Lookup(np.zeros((0, d), np.float32), np.zeros(0, bool))
        )
        history, valid = padded_histories(lookup, lengths, d)
        return torch.from_numpy(history), torch.from_numpy(valid)

    def _sampled_users(self) -> torch.Tensor:
        """User-tower outputs of random artifact users, the negatives of the item side; made
        once, from their table rows and artifact histories. Neither moves (unless
        train_artifact_rows), so a restarted trainer makes the same ones."""
        if self._user_negatives is None:
            known = self.features.users.ids
            rng = np.random.default_rng(self.config.seed)
            sample = rng.choice(known, min(self.config.negatives, len(known)), replace=False)
            with torch.no_grad():
                self._user_negatives = self.two_tower.user_tower(
                    torch.from_numpy(self._vectors(USER_TABLE, sample)),
                    *self._histories(sample, with_recent=False),
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

    def _train(
        self, pair_users: np.ndarray, pair_items: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(user ids, their new vectors, item ids, their new vectors); ids sorted."""
        user_ids, user_of_pair = np.unique(pair_users, return_inverse=True)
        item_ids, item_of_pair = np.unique(pair_items, return_inverse=True)
        user_vectors = torch.from_numpy(self._vectors(USER_TABLE, user_ids)).requires_grad_()
        item_vectors = torch.from_numpy(self._vectors(ITEM_TABLE, item_ids)).requires_grad_()
        history, valid = self._histories(user_ids)
        attributes = self._attributes(item_ids)

        catalog = self.features.items.ids
        sampled = np.setdiff1d(
            rng.choice(catalog, min(self.config.negatives, len(catalog)), replace=False), item_ids
        )
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
        clicked_by = torch.from_numpy(
            np.pad(clicked.T[item_of_pair], ((0, 0), (0, len(other_users))))
        )
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
            item_rate[
                torch.from_numpy(self.features.item_counts[self.features.items.rows(item_ids)] > 0)
            ] = 0.0
        for _ in range(self.config.steps):
            users = self.two_tower.user_tower(user_vectors, history, valid)
            user = users[torch.from_numpy(user_of_pair)]
            items = self.two_tower.item_tower_from_vectors(item_vectors, attributes)
            item = items[torch.from_numpy(item_of_pair)]
            logits = (user @ torch.cat([items, negatives]).T / self.temperature).masked_fill(
                masked, float("-inf")
            )
            user_logits = (item @ torch.cat([users, other_users]).T / self.temperature).masked_fill(
                clicked_by, float("-inf")
            )
            loss = F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(
                user_logits, user_target, reduction="sum"
            )
            user_grad, item_grad = torch.autograd.grad(loss, [user_vectors, item_vectors])
            with torch.no_grad():
                user_vectors -= user_rate * user_grad
                item_vectors -= item_rate * item_grad

        return user_ids, user_vectors.detach().numpy(), item_ids, item_vectors.detach().numpy()
