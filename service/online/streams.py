"""The logs of online learning and of the catalog, as interfaces.

Event log: what users did, appended by the gateway and read by the online trainer in a
consumer group. Delivery is at least once: an entry stays pending until the trainer acks
it after its writes landed; a restarted trainer gets its pending entries again, and a
trainer that died for good has its entries claimed by another after they sat idle.

Item-update feed: which items the trainer rewrote, read by every serving process (each
from its own cursor, no group), which then re-embeds those items into its FAISS index.

Catalog feed: the catalog API's changes (items upserted with attributes, hidden, unhidden,
deleted), read by every serving process and gateway from the start at each start. It is
never trimmed: replaying it is how a change outlives restarts.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.metrics import EVENTS_APPENDED
from service.online.journal import InMemoryOutcomeJournal, OutcomeJournal
from service.schemas import Event, EventsRequest, EventsResponse


class EventLogUnavailable(Exception):
    """The log did not take the events; none of them were appended, the caller may retry."""


@dataclass(frozen=True)
class LoggedEvent:
    entry_id: str  # the log's id, "<ms>-<seq>": ordered, and the append time in milliseconds
    user_id: int
    item_id: int
    type: str
    timestamp: float  # when it happened, Unix seconds
    request_id: str | None = None  # the answer it reacts to, if the client said

    @property
    def appended_at(self) -> float:
        return int(self.entry_id.split("-", 1)[0]) / 1000.0


def event_fields(event: Event, now: float) -> dict[str, str]:
    """An event as the log's string fields; an event without a timestamp happened `now`."""
    fields = {
        "user": str(event.user_id),
        "item": str(event.item_id),
        "type": event.type,
        "ts": repr(event.timestamp if event.timestamp is not None else now),
    }
    if event.request_id is not None:
        fields["req"] = event.request_id
    return fields


def logged_event(entry_id: str, fields: dict[str, str]) -> LoggedEvent:
    return LoggedEvent(
        entry_id,
        int(fields["user"]),
        int(fields["item"]),
        fields["type"],
        float(fields["ts"]),
        fields.get("req"),
    )


class EventLog(ABC):
    @abstractmethod
    def append(self, events: list[Event]) -> list[str]:
        """Append all events or none (raises EventLogUnavailable); returns their entry ids."""

    @abstractmethod
    def read(self, consumer: str, count: int, block_seconds: float) -> list[LoggedEvent]:
        """Up to `count` entries for `consumer`: first those it was given before and did not
        ack (it restarted), then entries other consumers left idle too long (they died),
        then new ones, waiting up to `block_seconds` for them."""

    @abstractmethod
    def ack(self, entry_ids: list[str]) -> None:
        """The entries' effects are written: they are not delivered again."""

    @abstractmethod
    def backlog(self) -> int:
        """Entries appended and not yet acked by the trainers' group."""

    def journal(self) -> OutcomeJournal:
        """Where a trainer reading this log records the batch it is writing (`service.online.journal`)."""
        return InMemoryOutcomeJournal()

    def close(self) -> None:
        """Release connections; the in-memory log has none."""


def accept_events(log: EventLog, request: EventsRequest) -> EventsResponse:
    """What both transports do with a batch of events: append all of them, then answer."""
    log.append(request.events)
    for event in request.events:
        EVENTS_APPENDED.labels(event.type).inc()
    return EventsResponse(accepted=len(request.events))


@dataclass(frozen=True)
class ItemUpdates:
    cursor: str  # pass back to `ItemUpdateFeed.read` for what comes after
    item_ids: np.ndarray  # uint64, distinct
    published_at: float  # Unix seconds of the newest update read; 0 when none


class ItemUpdateFeed(ABC):
    START = "0"  # the cursor before the first update

    @abstractmethod
    def publish(self, item_ids: np.ndarray) -> None:
        """Announce that these items' vectors were rewritten in the embedding table."""

    @abstractmethod
    def read(self, cursor: str, block_seconds: float, count: int = 100) -> ItemUpdates:
        """Updates published after `cursor`, waiting up to `block_seconds` for one."""

    def close(self) -> None:
        """Release connections; the in-memory feed has none."""


CatalogOp = Literal["upsert", "hide", "unhide", "delete"]


@dataclass(frozen=True)
class CatalogChange:
    op: CatalogOp
    item_ids: np.ndarray  # uint64, distinct
    attributes: list[dict[str, list[str]]] | None = None  # upsert: one per item


class CatalogFeed(ABC):
    START = "0"  # the cursor before the first change

    @abstractmethod
    def publish(self, change: CatalogChange) -> None:
        """Append a change; every reader applies it, in order."""

    @abstractmethod
    def read(
        self, cursor: str, block_seconds: float, count: int = 100
    ) -> tuple[str, list[CatalogChange]]:
        """(the cursor after them, the changes published after `cursor`), waiting up to
        `block_seconds` for one."""

    def close(self) -> None:
        """Release connections; the in-memory feed has none."""
