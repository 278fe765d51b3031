"""Online learning's workers, built from an artifact and the settings: the trainer (in the
serving process, or `recsys serve online-train`) and a serving process's index sync."""

from service.bundle import ModelBundle
from service.embeddings.store import EmbeddingStore
from service.online.index_sync import IndexSync
from service.online.interests import InterestUpdater
from service.online.parts import BLOCK_SECONDS, OnlineLearning
from service.online.trainer import OnlineTrainer, OnlineTrainerConfig
from service.retrieval.catalog import ItemCatalog
from service.retrieval.index import ItemIndex
from service.settings import Settings


def make_trainer(
    settings: Settings, bundle: ModelBundle, store: EmbeddingStore, online: OnlineLearning
) -> OnlineTrainer:
    config = OnlineTrainerConfig(
        batch_events=settings.online_batch_events,
        learning_rate=settings.online_learning_rate,
        new_row_learning_rate=settings.online_new_row_learning_rate,
        steps=settings.online_steps,
        rows=settings.online_rows,
        anchor=settings.online_anchor,
        block_seconds=BLOCK_SECONDS,
        history_length=settings.history_length,
    )
    interests = InterestUpdater(
        bundle.two_tower,
        bundle.features,
        store,
        bundle.clusters,
        bundle.mixtures,
        bundle.knn_embed_config.half_life,
    )
    return OnlineTrainer(
        bundle.two_tower,
        bundle.features,
        bundle.histories,
        store,
        online.trainer_events,
        online.recent,
        online.updates,
        config,
        settings.trainer_consumer,
        interests,
    )


def make_index_sync(
    bundle: ModelBundle,
    store: EmbeddingStore,
    index: ItemIndex,
    online: OnlineLearning,
    catalog: ItemCatalog,
) -> IndexSync:
    return IndexSync(
        bundle.two_tower,
        catalog,
        store,
        index,
        online.updates,
        BLOCK_SECONDS,
        bundle.clusters,
        online.catalog,
    )
