"""The online trainer's write-ahead record of one batch: what the batch will write, saved
before the first write, so a batch read again after a crash writes what its first pass
computed instead of training again from rows that pass may already have rewritten.

A batch's writes then are:
- rows (user, item and interest vectors), SET to the recorded values: writing them twice is
  writing them once;
- admission counts and recent-item appends, which add: each is done once and then marked
  done in the record, and a replay skips what is marked. A crash between such a step and
  its mark (one Redis round trip) repeats that one step.

Redis layout, one hash per trainer (consumer) beside the event stream:

    <stream>:outcome:<group>:<consumer>   entries  the batch's entry ids, comma separated
                                          outcome  the arrays below, an .npz (no pickle)
                                          counted_user, counted_item
                                                   "1" once that table's admission counts were added
                                          pushed   "1" once the recent items were appended
"""

import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields

import numpy as np

STEPS = ("counted_user", "counted_item", "pushed")


@dataclass
class BatchOutcome:
    entries: list[str]
    count_users: np.ndarray  # every event's user and item, for the admission counts
    count_items: np.ndarray
    user_ids: np.ndarray  # rows the batch trained, and their new vectors
    user_vectors: np.ndarray
    item_ids: np.ndarray
    item_vectors: np.ndarray
    interest_users: np.ndarray  # kNN-Embed interest rows after the batch's clicks
    interest_rows: np.ndarray
    recent_users: np.ndarray  # (user, item) appends to the users' recent items, in order
    recent_items: np.ndarray
    published: np.ndarray  # items announced on the update feed
    # The optimizer state of the trained rows, aligned with user_ids / item_ids (a record
    # saved by a trainer that kept none has none: the rows are written without it).
    user_state: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    item_state: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "entries"}
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, entries: list[str], data: bytes) -> "BatchOutcome":
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(entries, **{name: arrays[name] for name in arrays.files})


class OutcomeJournal(ABC):
    """One record per consumer: the batch it is writing, if any."""

    @abstractmethod
    def save(self, consumer: str, outcome: BatchOutcome) -> None: ...

    @abstractmethod
    def load(self, consumer: str, entries: list[str]) -> tuple[BatchOutcome | None, set[str]]:
        """The record of exactly this batch and the steps marked done; (None, {}) if none."""

    @abstractmethod
    def mark(self, consumer: str, step: str) -> None: ...

    @abstractmethod
    def clear(self, consumer: str) -> None: ...


class InMemoryOutcomeJournal(OutcomeJournal):
    """For the in-process trainer: a crash takes the record and the in-memory log together."""

    def __init__(self):
        self._records: dict[str, tuple[BatchOutcome, set[str]]] = {}

    def save(self, consumer: str, outcome: BatchOutcome) -> None:
        self._records[consumer] = (outcome, set())

    def load(self, consumer: str, entries: list[str]) -> tuple[BatchOutcome | None, set[str]]:
        outcome, done = self._records.get(consumer, (None, set()))
        return (
            (outcome, done) if outcome is not None and outcome.entries == entries else (None, set())
        )

    def mark(self, consumer: str, step: str) -> None:
        self._records[consumer][1].add(step)

    def clear(self, consumer: str) -> None:
        self._records.pop(consumer, None)


class RedisOutcomeJournal(OutcomeJournal):
    def __init__(self, client, stream: str, group: str):
        self.client = client
        self.prefix = f"{stream}:outcome:{group}:"

    def key(self, consumer: str) -> str:
        return self.prefix + consumer

    def save(self, consumer: str, outcome: BatchOutcome) -> None:
        key = self.key(consumer)
        pipe = self.client.pipeline(transaction=True)  # one key: also atomic on Cluster
        pipe.delete(key)
        pipe.hset(
            key, mapping={"entries": ",".join(outcome.entries), "outcome": outcome.to_bytes()}
        )
        pipe.execute()

    def load(self, consumer: str, entries: list[str]) -> tuple[BatchOutcome | None, set[str]]:
        record = self.client.hgetall(self.key(consumer))
        if not record or record[b"entries"].decode().split(",") != entries:
            return None, set()
        done = {step for step in STEPS if record.get(step.encode()) == b"1"}
        return BatchOutcome.from_bytes(entries, record[b"outcome"]), done

    def mark(self, consumer: str, step: str) -> None:
        self.client.hset(self.key(consumer), step, "1")

    def clear(self, consumer: str) -> None:
        self.client.delete(self.key(consumer))
