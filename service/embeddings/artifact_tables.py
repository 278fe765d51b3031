"""The tables an artifact's models read (two-tower user and item id vectors, kNN-Embed's
user interests), and loading an artifact's rows into a store, in bulk, with progress."""

import logging

import numpy as np
from tqdm import tqdm

from service.embeddings.memory import InMemoryEmbeddingStore
from service.embeddings.redis_store import RedisEmbeddingStore, RedisStoreConfig
from service.embeddings.store import EmbeddingStore, TableConfig
from service.retrieval.knn_embed import INTEREST_TABLE, SMOOTHING_TABLE

log = logging.getLogger(__name__)

USER_TABLE, ITEM_TABLE = "user", "item"
LOAD_BATCH = 10_000


def table_configs(bundle, ttl_seconds: float | None = None) -> list[TableConfig]:
    dim, clusters = bundle.two_tower.config.id_dim, bundle.clusters.n_clusters
    return [
        TableConfig(USER_TABLE, dim, ttl_seconds=ttl_seconds),
        TableConfig(ITEM_TABLE, dim, ttl_seconds=ttl_seconds),
        TableConfig(INTEREST_TABLE, clusters, ttl_seconds=ttl_seconds),
        TableConfig(SMOOTHING_TABLE, clusters, ttl_seconds=ttl_seconds),
    ]


def artifact_vectors(bundle) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw ids and rows per table; row 0 of each embedding (unknown ids) is not a row."""
    state = bundle.two_tower.state_dict()
    mixtures = bundle.mixtures
    return {
        USER_TABLE: (bundle.features.users.ids, state["user_id.weight"][1:].numpy()),
        ITEM_TABLE: (bundle.features.items.ids, state["item_id.weight"][1:].numpy()),
        INTEREST_TABLE: (mixtures.user_ids, mixtures.counts),
        SMOOTHING_TABLE: (mixtures.user_ids, mixtures.smoothing),
    }


def load_artifact(store: EmbeddingStore, bundle, progress: bool = True) -> int:
    tables = artifact_vectors(bundle)
    total = sum(len(ids) for ids, _ in tables.values())
    with tqdm(total=total, desc="load vectors", unit="row", disable=not progress, mininterval=2) as bar:
        for table, (ids, vectors) in tables.items():
            for start in range(0, len(ids), LOAD_BATCH):
                store.put_many(table, ids[start : start + LOAD_BATCH], vectors[start : start + LOAD_BATCH])
                bar.update(len(ids[start : start + LOAD_BATCH]))
    return total


def holds_artifact(store: EmbeddingStore, bundle, sample: int = 100) -> bool:
    """Whether the store holds any of a sample of the artifact's user and item rows."""
    for table, (ids, _) in artifact_vectors(bundle).items():
        if len(ids) and store.get_many(table, ids[:: max(1, len(ids) // sample)]).found.any():
            return True
    return False


def in_memory_store(bundle, ttl_seconds: float | None = None) -> InMemoryEmbeddingStore:
    """An in-process table holding the artifact's vectors: the embedded default."""
    store = InMemoryEmbeddingStore(table_configs(bundle, ttl_seconds))
    load_artifact(store, bundle, progress=False)
    return store


def open_store(settings, bundle) -> EmbeddingStore:
    """The configured store, holding the artifact's vectors: in-process, or Redis (loaded
    once, by whichever process finds the artifact's namespace empty; loads are idempotent)."""
    if settings.redis_url is None:
        return in_memory_store(bundle, settings.embedding_ttl_seconds)
    tables = table_configs(bundle, settings.embedding_ttl_seconds)
    config = RedisStoreConfig(
        settings.redis_url,
        cluster=settings.redis_cluster,
        namespace=settings.redis_namespace or bundle.namespace,
        socket_timeout=settings.redis_socket_timeout,
        cache_entries=settings.embedding_cache_entries,
        cache_ttl_seconds=settings.embedding_cache_ttl_seconds,
    )
    store = RedisEmbeddingStore(tables, config)
    if not holds_artifact(store, bundle):
        log.info("Redis namespace %r holds none of artifact %s: loading its vectors", config.namespace, bundle.version)
        load_artifact(store, bundle)
    return store
