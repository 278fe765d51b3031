"""Online learning's parts, opened beside the embedding table: in-process ones for the
embedded service, Redis ones (the event stream shared by every artifact version; the recent
items and the item-update feed under the table's namespace) when the table is on Redis."""

import threading
from dataclasses import dataclass, field, replace

from service.bundle import ModelBundle
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig, connect
from service.embeddings.store import EmbeddingStore
from service.online.index_sync import IndexSync
from service.online.interests import InterestUpdater
from service.online.memory import InMemoryEventLog, InMemoryItemUpdateFeed
from service.online.recent import InMemoryRecentItems, RecentItems, RedisRecentItems
from service.online.redis_streams import RedisEventLog, RedisItemUpdateFeed
from service.online.streams import EventLog, ItemUpdateFeed
from service.online.trainer import OnlineTrainer, OnlineTrainerConfig
from service.retrieval.index import ItemIndex

BLOCK_SECONDS = 1.0  # how long background readers wait on a stream; their sockets wait longer


@dataclass
class OnlineLearning:
    events: EventLog  # appends, on the request path
    trainer_events: EventLog  # the same log, for the trainer's blocking reads
    recent: RecentItems | None  # None in a gateway, which only appends events
    updates: ItemUpdateFeed | None
    _closers: list = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, name: str, loop) -> None:
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


def open_online(settings, bundle: ModelBundle, store: EmbeddingStore) -> OnlineLearning:
    """The parts beside `store`: in-process ones next to an in-process table; on a Redis table,
    Redis ones under its namespace, sharing its client and breaker on the request path."""
    if not isinstance(store, RedisEmbeddingStore):
        events = InMemoryEventLog()
        recent = InMemoryRecentItems(settings.history_length, settings.embedding_ttl_seconds)
        return OnlineLearning(events, events, recent, InMemoryItemUpdateFeed())
    namespace = store.config.namespace
    background = connect(replace(store.config, socket_timeout=BLOCK_SECONDS + 4, retries=3))
    events = RedisEventLog(background, settings.events_stream, f"trainer.{namespace}", settings.events_max_length)
    events.ensure_group()  # before the first event is accepted, so the group sees every one
    return OnlineLearning(
        RedisEventLog(store.client, settings.events_stream, events.group, settings.events_max_length),
        events,
        RedisRecentItems(store.client, namespace, settings.history_length, settings.embedding_ttl_seconds, store.breaker),
        RedisItemUpdateFeed(background, namespace),
        [background.close],
    )


def open_event_log(settings, namespace: str) -> OnlineLearning:
    """A gateway's part of online learning: appends to the shared Redis stream, whose
    trainer group (created here if need be) is the one `open_online` names."""
    client = connect(RedisStoreConfig(settings.redis_url, cluster=settings.redis_cluster, socket_timeout=settings.redis_socket_timeout))
    events = RedisEventLog(client, settings.events_stream, f"trainer.{namespace}", settings.events_max_length)
    events.ensure_group()
    return OnlineLearning(events, events, None, None, [client.close])


def make_trainer(settings, bundle: ModelBundle, store: EmbeddingStore, online: OnlineLearning) -> OnlineTrainer:
    config = OnlineTrainerConfig(
        batch_events=settings.online_batch_events,
        learning_rate=settings.online_learning_rate,
        steps=settings.online_steps,
        block_seconds=BLOCK_SECONDS,
        history_length=settings.history_length,
    )
    interests = InterestUpdater(
        bundle.two_tower, bundle.features, store, bundle.clusters, bundle.mixtures, bundle.knn_embed_config.half_life
    )
    return OnlineTrainer(
        bundle.two_tower, bundle.features, bundle.histories, store,
        online.trainer_events, online.recent, online.updates, config, settings.trainer_consumer, interests,
    )


def make_index_sync(bundle: ModelBundle, store: EmbeddingStore, index: ItemIndex, online: OnlineLearning) -> IndexSync:
    return IndexSync(bundle.two_tower, bundle.features, store, index, online.updates, BLOCK_SECONDS, bundle.clusters)
