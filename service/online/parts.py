"""Online learning's parts one serving process holds, opened beside the embedding table:
in-process ones for the embedded service, Redis ones (the event stream shared by every
artifact version, and so is the catalog feed; the recent items and the item-update feed
under the table's namespace) when the table is on Redis, and only the event log and the catalog feed
in a gateway. No model here: a gateway opens its part without loading torch or FAISS."""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from service.embeddings.recent_items import InMemoryRecentItems, RecentItems, RedisRecentItems
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig, connect
from service.embeddings.store import EmbeddingStore
from service.online.memory_streams import (
    InMemoryCatalogFeed,
    InMemoryEventLog,
    InMemoryItemUpdateFeed,
)
from service.online.redis_streams import RedisCatalogFeed, RedisEventLog, RedisItemUpdateFeed
from service.online.streams import CatalogFeed, EventLog, ItemUpdateFeed
from service.settings import Settings

BLOCK_SECONDS = 1.0  # how long background readers wait on a stream; their sockets wait longer


@dataclass
class OnlineLearning:
    events: EventLog  # appends, on the request path
    trainer_events: EventLog  # the same log, for the trainer's blocking reads
    recent: RecentItems | None  # None in a gateway, which only appends events
    updates: ItemUpdateFeed | None
    catalog: CatalogFeed  # the catalog's changes, which every serving process applies
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, name: str, loop: Callable[[threading.Event], None]) -> None:
        """Run `loop(stop_event)` in a daemon thread until `stop()`."""
        thread = threading.Thread(target=loop, args=(self._stop,), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        for close in self._closers:
            close()


def open_online(settings: Settings, store: EmbeddingStore) -> OnlineLearning:
    """The parts beside `store`: in-process ones next to an in-process table; on a Redis table,
    Redis ones under its namespace, sharing its client and breaker on the request path."""
    if not isinstance(store, RedisEmbeddingStore):
        events = InMemoryEventLog()
        recent = InMemoryRecentItems(settings.history_length, settings.embedding_ttl_seconds)
        return OnlineLearning(
            events, events, recent, InMemoryItemUpdateFeed(), InMemoryCatalogFeed()
        )
    namespace = store.config.namespace
    background = connect(replace(store.config, socket_timeout=BLOCK_SECONDS + 4, retries=3))
    events = RedisEventLog(
        background, settings.events_stream, f"trainer.{namespace}", settings.events_max_length
    )
    events.ensure_group()  # before the first event is accepted, so the group sees every one
    return OnlineLearning(
        RedisEventLog(
            store.client, settings.events_stream, events.group, settings.events_max_length
        ),
        events,
        RedisRecentItems(
            store.client,
            namespace,
            settings.history_length,
            settings.embedding_ttl_seconds,
            store.breaker,
        ),
        RedisItemUpdateFeed(background, namespace),
        RedisCatalogFeed(background, settings.catalog_stream),
        [background.close],
    )


def open_event_log(settings: Settings, namespace: str) -> OnlineLearning:
    """A gateway's part of online learning: appends to the shared Redis stream, whose
    trainer group (created here if need be) is the one `open_online` names; and the
    catalog feed, which its fallback keeps to."""
    config = RedisStoreConfig.from_settings(settings)
    client = connect(config)
    background = connect(replace(config, socket_timeout=BLOCK_SECONDS + 4, retries=3))
    events = RedisEventLog(
        client, settings.events_stream, f"trainer.{namespace}", settings.events_max_length
    )
    events.ensure_group()
    return OnlineLearning(
        events,
        events,
        None,
        None,
        RedisCatalogFeed(background, settings.catalog_stream),
        [client.close, background.close],
    )
