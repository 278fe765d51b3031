"""An artifact's rows in the embedding tables: loading them into a store, in bulk, with
progress; and the configured store (`RECSYS_REDIS_*`, else in process) holding them."""

import logging

import numpy as np
from tqdm import tqdm

from service.bundle import ModelBundle
from service.embeddings.memory_store import InMemoryEmbeddingStore
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig
from service.embeddings.store import EmbeddingStore
from service.embeddings.tables import INTEREST_TABLE, ITEM_TABLE, SMOOTHING_TABLE, USER_TABLE
from service.settings import Settings

log = logging.getLogger(__name__)

LOAD_BATCH = 10_000


def artifact_vectors(bundle: ModelBundle) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw ids and rows per table; row 0 of each embedding (unknown ids) is not a row."""
    state = bundle.two_tower.state_dict()
    mixtures = bundle.mixtures
    return {
        USER_TABLE: (bundle.features.users.ids, state["user_id.weight"][1:].numpy()),
        ITEM_TABLE: (bundle.features.items.ids, state["item_id.weight"][1:].numpy()),
        INTEREST_TABLE: (mixtures.user_ids, mixtures.counts),
        SMOOTHING_TABLE: (mixtures.user_ids, mixtures.smoothing),
    }


def load_artifact(store: EmbeddingStore, bundle: ModelBundle, progress: bool = True) -> int:
    tables = artifact_vectors(bundle)
    total = sum(len(ids) for ids, _ in tables.values())
    with tqdm(
        total=total, desc="load vectors", unit="row", disable=not progress, mininterval=2
    ) as bar:
        for table, (ids, vectors) in tables.items():
            for start in range(0, len(ids), LOAD_BATCH):
                store.put_many(
                    table, ids[start : start + LOAD_BATCH], vectors[start : start + LOAD_BATCH]
                )
                bar.update(len(ids[start : start + LOAD_BATCH]))
    return total


def holds_artifact(store: EmbeddingStore, bundle: ModelBundle, sample: int = 100) -> bool:
    """Whether the store holds any of a sample of the artifact's user and item rows."""
    for table, (ids, _) in artifact_vectors(bundle).items():
        if len(ids) and store.get_many(table, ids[:: max(1, len(ids) // sample)]).found.any():
            return True
    return False


def in_memory_store(
    bundle: ModelBundle, ttl_seconds: float | None = None
) -> InMemoryEmbeddingStore:
    """An in-process table holding the artifact's vectors: the embedded default."""
    store = InMemoryEmbeddingStore(bundle.tables(ttl_seconds))
    load_artifact(store, bundle, progress=False)
    return store


def connect_store(settings: Settings, bundle: ModelBundle, bulk: bool = False) -> EmbeddingStore:
    """The configured store as it stands, nothing loaded: Redis under the artifact's
    namespace, or an empty in-process one. `bulk`: for work off the request path
    (`RedisStoreConfig.from_settings`)."""
    tables = bundle.tables(settings.embedding_ttl_seconds)
    if settings.redis_url is None:
        return InMemoryEmbeddingStore(tables)
    return RedisEmbeddingStore(
        tables,
        RedisStoreConfig.from_settings(
            settings, settings.redis_namespace or bundle.namespace, bulk
        ),
    )


def open_store(settings: Settings, bundle: ModelBundle, bulk: bool = False) -> EmbeddingStore:
    """The configured store, holding the artifact's vectors: in-process, or Redis (loaded
    once, by whichever process finds the artifact's namespace empty; loads are idempotent)."""
    store = connect_store(settings, bundle, bulk)
    if not holds_artifact(store, bundle):  # an in-process store always starts empty
        if isinstance(store, RedisEmbeddingStore):
            log.info(
                "Redis namespace %r holds none of artifact %s: loading its vectors",
                store.config.namespace,
                bundle.version,
            )
        load_artifact(store, bundle, progress=isinstance(store, RedisEmbeddingStore))
    return store
