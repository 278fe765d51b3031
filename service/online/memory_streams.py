"""In-process event log, item-update feed and catalog feed: the embedded default and the
test doubles of the Redis ones. Same delivery rules as a Redis Stream consumer group, but
nothing survives the process."""

import threading
import time
from collections import OrderedDict, deque

import numpy as np

from service.online.streams import (
    CatalogChange,
    CatalogFeed,
    EventLog,
    ItemUpdateFeed,
    ItemUpdates,
    LoggedEvent,
    event_fields,
    logged_event,
)
from service.schemas import Event


class _EntryIds:
    """Ids shaped like a stream's, "<ms>-<seq>", strictly increasing."""

    def __init__(self):
        self._ms, self._seq = 0, 0

    def next(self) -> str:
        ms = int(time.time() * 1000)
        if ms <= self._ms:
            ms, self._seq = self._ms, self._seq + 1
        else:
            self._seq = 0
        self._ms = ms
        return f"{ms}-{self._seq}"


class InMemoryEventLog(EventLog):
    def __init__(self, claim_idle_seconds: float = 30.0):
        self.claim_idle_seconds = claim_idle_seconds
        self._new: deque[LoggedEvent] = deque()
        self._pending: OrderedDict[str, tuple[LoggedEvent, str, float]] = (
            OrderedDict()
        )  # id -> (event, consumer, since)
        self._ids = _EntryIds()
        self._arrived = threading.Condition()

    def append(self, events: list[Event]) -> list[str]:
        with self._arrived:
            now = time.time()
            logged = [logged_event(self._ids.next(), event_fields(e, now)) for e in events]
            self._new.extend(logged)
            self._arrived.notify_all()
        return [e.entry_id for e in logged]

    def read(self, consumer: str, count: int, block_seconds: float) -> list[LoggedEvent]:
        deadline = time.monotonic() + block_seconds
        with self._arrived:
            own = [event for event, owner, _ in self._pending.values() if owner == consumer][:count]
            if own:
                return own
            now = time.monotonic()
            idle = [
                entry_id
                for entry_id, (_, _, since) in self._pending.items()
                if now - since >= self.claim_idle_seconds
            ][:count]
            if idle:
                for entry_id in idle:
                    event = self._pending[entry_id][0]
                    self._pending[entry_id] = (event, consumer, now)
                return [self._pending[entry_id][0] for entry_id in idle]
            while not self._new and self._arrived.wait(max(0.0, deadline - time.monotonic())):
                pass
            given = [self._new.popleft() for _ in range(min(count, len(self._new)))]
            for event in given:
                self._pending[event.entry_id] = (event, consumer, time.monotonic())
            return given

    def ack(self, entry_ids: list[str]) -> None:
        with self._arrived:
            for entry_id in entry_ids:
                self._pending.pop(entry_id, None)

    def backlog(self) -> int:
        with self._arrived:
            return len(self._new) + len(self._pending)


class InMemoryItemUpdateFeed(ItemUpdateFeed):
    def __init__(self, max_length: int = 100_000):
        self._updates: deque[tuple[str, np.ndarray]] = deque(maxlen=max_length)
        self._ids = _EntryIds()
        self._published = threading.Condition()

    def publish(self, item_ids: np.ndarray) -> None:
        with self._published:
            self._updates.append(
                (self._ids.next(), np.unique(np.asarray(item_ids, dtype=np.uint64)))
            )
            self._published.notify_all()

    def read(self, cursor: str, block_seconds: float, count: int = 100) -> ItemUpdates:
        after = _entry_key(cursor)
        deadline = time.monotonic() + block_seconds
        with self._published:
            while True:
                newer = [
                    (entry_id, ids)
                    for entry_id, ids in self._updates
                    if _entry_key(entry_id) > after
                ][:count]
                remaining = deadline - time.monotonic()
                if newer or remaining <= 0:
                    break
                self._published.wait(remaining)
        if not newer:
            return ItemUpdates(cursor, np.empty(0, np.uint64), 0.0)
        last = newer[-1][0]
        return ItemUpdates(
            last, np.unique(np.concatenate([ids for _, ids in newer])), _entry_key(last)[0] / 1000.0
        )


class InMemoryCatalogFeed(CatalogFeed):
    def __init__(self):
        self._changes: list[tuple[str, CatalogChange]] = []
        self._ids = _EntryIds()
        self._published = threading.Condition()

    def publish(self, change: CatalogChange) -> None:
        with self._published:
            self._changes.append((self._ids.next(), change))
            self._published.notify_all()

    def read(
        self, cursor: str, block_seconds: float, count: int = 100
    ) -> tuple[str, list[CatalogChange]]:
        after = _entry_key(cursor)
        deadline = time.monotonic() + block_seconds
        with self._published:
            while True:
                newer = [(i, c) for i, c in self._changes if _entry_key(i) > after][:count]
                remaining = deadline - time.monotonic()
                if newer or remaining <= 0:
                    break
                self._published.wait(remaining)
        return (newer[-1][0] if newer else cursor), [change for _, change in newer]


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
