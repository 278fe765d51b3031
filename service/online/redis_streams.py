"""Event log and item-update feed on Redis Streams (standalone or Cluster: each is one key).

    events:        <stream>               XADD fields user, item, type, ts (decimal text)
                                          group <group>, one per artifact namespace
    item updates:  upd:{<namespace>}      XADD field ids = distinct item ids, little-endian uint64
    catalog:       <catalog stream>       XADD fields op (upsert, hide, unhide, delete), ids (as
                                          above, in the request's order), attributes (upsert:
                                          a JSON list, one {column: [values]} per id); one per
                                          deployment, as the events stream

An append is one MULTI/EXEC of XADDs, so a request's events are all in the log or none
are. The first two streams are capped (approximate MAXLEN): the events stream must be sized
so that the trainers' backlog (`recsys_events_backlog`) never reaches the cap, or the oldest
unprocessed entries are trimmed (and counted as lost when a trainer meets them). The catalog
stream is never trimmed: every process replays it whole at its start.
"""

import json
import logging
import time

import numpy as np
import redis

from service.metrics import EVENTS_LOST
from service.online.journal import RedisOutcomeJournal
from service.online.streams import (
    CatalogChange,
    CatalogFeed,
    EventLog,
    EventLogUnavailable,
    ItemUpdateFeed,
    ItemUpdates,
    LoggedEvent,
    event_fields,
    logged_event,
)
from service.schemas import Event

log = logging.getLogger(__name__)

ERRORS = (redis.RedisError, OSError)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisEventLog(EventLog):
    def __init__(
        self,
        client,
        stream: str = "recsys:events",
        group: str = "trainer",
        max_length: int = 10_000_000,
        claim_idle_seconds: float = 30.0,
    ):
        self.client = client
        self.stream = stream
        self.group = group
        self.max_length = max_length
        self.claim_idle_ms = int(claim_idle_seconds * 1000)

    def ensure_group(self) -> None:
        """Create the stream and the group if missing. A new group starts at the stream's
        end: the service calls this before it accepts its first event, so none is missed."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def append(self, events: list[Event]) -> list[str]:
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        for event in events:
            pipe.xadd(
                self.stream, event_fields(event, now), maxlen=self.max_length, approximate=True
            )
        try:
            return [_text(entry_id) for entry_id in pipe.execute()]
        except ERRORS as exc:
            raise EventLogUnavailable(f"event log unavailable: {exc}") from exc

    def _entries(self, replies, group_reply: bool = True) -> list[LoggedEvent]:
        """Entries from XREADGROUP or XAUTOCLAIM; entries trimmed while pending are acked and counted lost."""
        entries = replies[0][1] if group_reply else replies
        events, trimmed = [], []
        for entry_id, fields in entries:
            if not fields:
                trimmed.append(_text(entry_id))
                continue
            events.append(
                logged_event(_text(entry_id), {_text(k): _text(v) for k, v in fields.items()})
            )
        if trimmed:
            log.error(
                "%d pending events were trimmed from %s before processing",
                len(trimmed),
                self.stream,
            )
            EVENTS_LOST.inc(len(trimmed))
            self.ack(trimmed)
        return events

    def _read(self, consumer: str, count: int, block_seconds: float) -> list[LoggedEvent]:
        own = self.client.xreadgroup(self.group, consumer, {self.stream: "0"}, count=count)
        if own and own[0][1]:
            return self._entries(own)
        _, claimed, deleted = self.client.xautoclaim(
            self.stream, self.group, consumer, self.claim_idle_ms, "0-0", count
        )
        if deleted:
            EVENTS_LOST.inc(len(deleted))
        if claimed:
            return self._entries(claimed, group_reply=False)
        block = int(block_seconds * 1000) or None  # BLOCK 0 would wait forever
        new = self.client.xreadgroup(
            self.group, consumer, {self.stream: ">"}, count=count, block=block
        )
        return self._entries(new) if new else []

    def read(self, consumer: str, count: int, block_seconds: float) -> list[LoggedEvent]:
        try:
            return self._read(consumer, count, block_seconds)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning(
                "group %s of %s is gone (stream deleted?): creating it again",
                self.group,
                self.stream,
            )
            self.ensure_group()
            return self._read(consumer, count, block_seconds)

    def journal(self) -> RedisOutcomeJournal:
        return RedisOutcomeJournal(self.client, self.stream, self.group)

    def ack(self, entry_ids: list[str]) -> None:
        if entry_ids:
            self.client.xack(self.stream, self.group, *entry_ids)

    def backlog(self) -> int:
        for group in self.client.xinfo_groups(self.stream):
            if _text(group["name"]) == self.group:
                lag = group.get("lag")
                if (
                    lag is None
                ):  # Redis cannot tell after deletions: count from the group's position
                    lag = len(
                        self.client.xrange(
                            self.stream, min=f"({_text(group['last-delivered-id'])}", count=10_000
                        )
                    )
                return int(lag) + int(group["pending"])
        return 0


class RedisItemUpdateFeed(ItemUpdateFeed):
    def __init__(self, client, namespace: str, max_length: int = 100_000):
        self.client = client
        self.stream = f"upd:{{{namespace}}}"
        self.max_length = max_length

    def publish(self, item_ids: np.ndarray) -> None:
        ids = np.unique(np.asarray(item_ids, dtype=np.uint64)).astype("<u8")
        self.client.xadd(
            self.stream, {"ids": ids.tobytes()}, maxlen=self.max_length, approximate=True
        )

    def read(self, cursor: str, block_seconds: float, count: int = 100) -> ItemUpdates:
        block = int(block_seconds * 1000) or None
        replies = self.client.xread({self.stream: cursor}, count=count, block=block)
        if not replies or not replies[0][1]:
            return ItemUpdates(cursor, np.empty(0, np.uint64), 0.0)
        entries = replies[0][1]
        ids = [np.frombuffer(fields[b"ids"], dtype="<u8") for _, fields in entries]
        last = _text(entries[-1][0])
        return ItemUpdates(
            last, np.unique(np.concatenate(ids)).astype(np.uint64), int(last.split("-")[0]) / 1000.0
        )


class RedisCatalogFeed(CatalogFeed):
    def __init__(self, client, stream: str):
        self.client = client
        self.stream = stream

    def publish(self, change: CatalogChange) -> None:
        fields = {
            "op": change.op,
            "ids": np.asarray(change.item_ids, dtype="<u8").tobytes(),
            "attributes": json.dumps(change.attributes) if change.attributes is not None else "",
        }
        self.client.xadd(self.stream, fields)

    def read(
        self, cursor: str, block_seconds: float, count: int = 100
    ) -> tuple[str, list[CatalogChange]]:
        block = int(block_seconds * 1000) or None
        replies = self.client.xread({self.stream: cursor}, count=count, block=block)
        if not replies or not replies[0][1]:
            return cursor, []
        changes = [
            CatalogChange(
                _text(fields[b"op"]),
                np.frombuffer(fields[b"ids"], dtype="<u8").astype(np.uint64),
                json.loads(fields[b"attributes"]) if fields[b"attributes"] else None,
            )
            for _, fields in replies[0][1]
        ]
        return _text(replies[0][1][-1][0]), changes
