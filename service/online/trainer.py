"""Online training (Monolith's real-time half, scaled down): events in, id vectors out.

For each batch read from the event log:
1. every event counts toward its user's and item's admission (the tables' frequency filter);
2. positive events (click, purchase) of admitted users and items train the id vectors (the
   embedding table's rows) with the loss the artifact was trained with: each pair's user
   against the batch's items and a uniform catalog sample, logits corrected by log q. Each
   row takes Adagrad steps; its accumulator is kept in the state tables beside the rows, so
   a restarted trainer continues it. A row the artifact fitted on n interactions starts
   with n + 1 times the initial accumulator (small steps, as if its optimizer had been
   kept), and after each step gives back a share of its distance to the artifact's value,
   so a burst of clicks cannot throw a well-trained row away. The towers' dense layers stay
   as trained (Monolith also syncs dense parameters far less often than sparse ones);
3. what the batch will write is recorded first (`service.online.journal`), then the
   occurrences are counted, the new vectors and their state written to the embedding table
   with fresh TTLs, the users' interests (kNN-Embed) rewritten, the positive items appended
   to their users' recent items, the rewritten items announced on the update feed (every
   serving process re-embeds them into its index), and only then are the events acked and
   the record dropped.

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
from service.embeddings.tables import (
    INTEREST_TABLE,
    ITEM_STATE_TABLE,
    ITEM_TABLE,
    USER_STATE_TABLE,
    USER_TABLE,
)
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


ROWS = ("all", "new")


@dataclass(frozen=True)
class OnlineTrainerConfig:
    batch_events: int = 512  # events read per batch
    learning_rate: float = 0.01  # Adagrad's, for rows the artifact trained
    # For rows it lacks (new users and items): they have nothing better to start from, but a
    # new item placed from one or two clicks takes answer places from the catalogue.
    new_row_learning_rate: float = 0.02
    steps: int = 1  # optimizer steps per batch
    negatives: int = 256  # uniformly sampled catalog items per batch
    # "all": every admitted row learns; "new": only rows the artifact did not train.
    rows: str = "all"
    # Share of its distance to the artifact's value that a row the artifact trained gives
    # back after each step (decoupled, as AdamW's decay): it bounds how far clicks take it.
    anchor: float = 0.1
    # Adagrad's starting accumulator for a row, per interaction the artifact trained it on
    # (plus one): a row fitted on many interactions starts with small steps.
    initial_accumulator: float = 0.1
    block_seconds: float = 1.0  # how long a read waits for new events
    history_length: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, not {self.rows!r}")
        if not 0.0 <= self.anchor < 1.0:
            raise ValueError(f"anchor must be in [0, 1), not {self.anchor}")
        if self.initial_accumulator <= 0:  # Adagrad divides by the accumulator's root
            raise ValueError(
                f"initial_accumulator must be positive, not {self.initial_accumulator}"
            )


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
        no_state = np.empty((0, dim), np.float32)
        user_ids, user_vectors, user_state = none, no_vectors, no_state
        item_ids, item_vectors, item_state = none, no_vectors, no_state
        if trainable.any():
            user_ids, user_vectors, user_state, item_ids, item_vectors, item_state = self._train(
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
            user_state,
            item_state,
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
            (USER_STATE_TABLE, outcome.user_ids[: len(outcome.user_state)], outcome.user_state),
            (ITEM_STATE_TABLE, outcome.item_ids[: len(outcome.item_state)], outcome.item_state),
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

    def _histories(self, user_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of each user's latest items (artifact history, then recent) as the user
        tower takes them: [B, L, d] left-padded, and where a row exists."""
        length = self.config.history_length
        recent = self.recent.get_many(user_ids)
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

    def _evidence(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Interactions the artifact trained each row on (0: a row it lacks)."""
        if table == USER_TABLE:
            return np.array([len(self.histories.get(u)) for u in ids.tolist()], dtype=np.float32)
        return self.features.item_counts[self.features.items.rows(ids)].astype(np.float32)

    def _accumulators(self, table: str, ids: np.ndarray, evidence: np.ndarray) -> np.ndarray:
        """Adagrad's accumulated squared gradients of rows; a row without state (first
        trained here, or its state expired) starts from the artifact's evidence for it."""
        lookup = self._lookup(table, ids)
        start = self.config.initial_accumulator * (1.0 + evidence)[:, None]
        return np.where(lookup.found[:, None], lookup.vectors, start).astype(np.float32)

    def _anchors(self, weight: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The artifact's values of rows (the embedding it was trained with)."""
        return weight.detach()[torch.from_numpy(rows)]

    def _train(
        self, pair_users: np.ndarray, pair_items: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, ...]:
        """(user ids, their new vectors and accumulators, item ids, their new vectors and
        accumulators); ids sorted.

        The loss is the batch training's: each pair's user against the batch's items and a
        uniform catalog sample, logits corrected by log q, the expected count of each item
        among those candidates (batch items come by popularity, the sample uniformly). Each
        row takes Adagrad steps (its accumulator kept in the state table, so a restarted
        trainer continues it); then a row the artifact trained gives back `anchor` of its
        distance to the artifact's value. An Adagrad step moves each coordinate by at most
        the learning rate, so no burst of clicks takes such a row further than
        (1 - anchor) / anchor x learning_rate x sqrt(dim) from it."""
        config = self.config
        user_ids, user_of_pair = np.unique(pair_users, return_inverse=True)
        item_ids, item_of_pair = np.unique(pair_items, return_inverse=True)
        history, valid = self._histories(user_ids)
        attributes = self._attributes(item_ids)

        catalog = self.features.items.ids
        sampled = np.setdiff1d(
            rng.choice(catalog, min(config.negatives, len(catalog)), replace=False), item_ids
        )
        with torch.no_grad():
            negatives = self.two_tower.item_tower_from_vectors(
                torch.from_numpy(self._vectors(ITEM_TABLE, sampled)), self._attributes(sampled)
            )
        counts = self.features.item_counts
        popularity = counts[self.features.items.rows(np.concatenate([item_ids, sampled]))]
        # The uniform part never 0, so log q stays finite when the batch holds the catalog.
        uniform = max(len(sampled), 1) / len(catalog)
        expected = len(pair_items) * popularity / max(counts.sum(), 1) + uniform
        log_q = torch.from_numpy(np.log(expected).astype(np.float32))
        # A batch item the same user also clicked is not a negative for that user's other pairs.
        clicked = np.zeros((len(user_ids), len(item_ids)), dtype=bool)
        clicked[user_of_pair, item_of_pair] = True
        accidental = clicked[user_of_pair]
        accidental[np.arange(len(pair_users)), item_of_pair] = False
        masked = torch.from_numpy(np.pad(accidental, ((0, 0), (0, len(sampled)))))
        target = torch.from_numpy(item_of_pair.astype(np.int64))
        pair_of_user = torch.from_numpy(user_of_pair)

        rows = []  # per table: vectors, accumulators, learning rates, anchors, anchored
        for table, state_table, ids, weight, artifact_rows in (
            (
                USER_TABLE,
                USER_STATE_TABLE,
                user_ids,
                self.two_tower.user_id.weight,
                self.features.users.rows(user_ids),
            ),
            (
                ITEM_TABLE,
                ITEM_STATE_TABLE,
                item_ids,
                self.two_tower.item_id.weight,
                self.features.items.rows(item_ids),
            ),
        ):
            evidence = self._evidence(table, ids)
            trained = torch.from_numpy(evidence > 0).unsqueeze(1)
            rate = torch.where(
                trained,
                0.0 if config.rows == "new" else config.learning_rate,
                config.new_row_learning_rate,
            )
            rows.append(
                (
                    torch.from_numpy(self._vectors(table, ids)).requires_grad_(),
                    torch.from_numpy(self._accumulators(state_table, ids, evidence)),
                    rate,
                    self._anchors(weight, artifact_rows),
                    trained & (rate > 0),
                )
            )
        (user_vectors, *_), (item_vectors, *_) = rows
        for _ in range(config.steps):
            users = self.two_tower.user_tower(user_vectors, history, valid)
            items = self.two_tower.item_tower_from_vectors(item_vectors, attributes)
            logits = users[pair_of_user] @ torch.cat([items, negatives]).T / self.temperature
            logits = (logits - log_q).masked_fill(masked, float("-inf"))
            loss = F.cross_entropy(logits, target, reduction="sum")
            grads = torch.autograd.grad(loss, [user_vectors, item_vectors])
            with torch.no_grad():
                for (vectors, accumulator, rate, anchor, anchored), grad in zip(rows, grads):
                    accumulator += grad.square() * (rate > 0)
                    vectors -= rate * grad / accumulator.sqrt()
                    pulled = anchor + (1.0 - config.anchor) * (vectors - anchor)
                    vectors.copy_(torch.where(anchored, pulled, vectors))
        (_, user_accumulator, *_), (_, item_accumulator, *_) = rows
        return (
            user_ids,
            user_vectors.detach().numpy(),
            user_accumulator.numpy(),
            item_ids,
            item_vectors.detach().numpy(),
            item_accumulator.numpy(),
        )
