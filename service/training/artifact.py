"""Train everything one artifact holds: two-tower retrieval, the item index, the ranker."""

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from service.bundle import ModelBundle
from service.data.feature_space import FeatureSpace
from service.data.histories import UserHistories
from service.data.schema import Dataset
from service.ranking.models import trained_variant
from service.retrieval.index import ItemIndex, SearchParams
from service.retrieval.item_to_item import ItemNeighbours
from service.retrieval.knn_embed import ItemClusters, KnnEmbedConfig, UserMixtures
from service.retrieval.popular import PopularItems
from service.retrieval.two_tower import (
    TwoTowerConfig,
    cold_user_vector,
    item_vectors,
    train_two_tower,
    user_vectors,
)
from service.training.ranker import (
    CandidateLists,
    RankerTrainConfig,
    build_rows,
    compress_ranker,
    new_ranker,
    train_listwise_ranker,
    train_ranker,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    ranker: RankerTrainConfig = field(default_factory=RankerTrainConfig)
    knn_embed: KnnEmbedConfig = field(default_factory=KnnEmbedConfig)
    index_factory: str = "auto"
    nprobe: int = 32
    item_neighbours: int = 50  # the item-to-item source: neighbours kept per item


def train(
    dataset: Dataset,
    config: TrainConfig = TrainConfig(),
    ranker_lists: CandidateLists | None = None,
    ranker: bool = True,
) -> tuple[ModelBundle, dict]:
    """Returns the (unsaved) bundle and the metrics to record in its manifest.

    `ranker_lists`: validation's candidate lists (`service.evaluation.validate`), which the
    ranker is trained on; without them it is trained on rows built from the training
    interactions, which the retriever has fitted. `ranker=False`: the ranker is left
    untrained (validation's own models, which only retrieve)."""
    started = time.perf_counter()
    features = FeatureSpace.build(dataset)
    interactions = dataset.interactions
    log.info(
        "feature space: %d users, %d items, %d attribute values",
        len(features.users),
        len(features.items),
        len(features.attribute_values),
    )

    two_tower, two_tower_metrics = train_two_tower(interactions, features, config.two_tower)
    vectors = item_vectors(two_tower, features)
    index = ItemIndex.build(
        features.items.ids,
        vectors,
        config.index_factory,
        SearchParams(nprobe=config.nprobe),
        seed=config.two_tower.seed,
    )
    log.info("indexed %d items", len(index))
    histories = UserHistories.from_interactions(interactions)
    clusters, mixtures = build_interests(two_tower, features, histories, vectors, config.knn_embed)

    score_scale = 1.0 / config.two_tower.temperature
    if not ranker:
        model, ranker_metrics = new_ranker(features, config.ranker), {"training": "none"}
        compressed = {}
    else:
        if ranker_lists is not None:
            model, ranker_metrics, rows = train_listwise_ranker(
                ranker_lists, features, config.ranker, score_scale
            )
        else:
            rows = build_rows(interactions, features, two_tower, index, vectors, config.ranker)
            model, ranker_metrics = train_ranker(rows, features, config.ranker, score_scale)
        compressed = compress_ranker(model, rows, features, config.ranker, score_scale)
    ranker_metrics["variants"] = {method: variant.metrics for method, variant in compressed.items()}

    counts = features.item_counts[1:]
    order = np.lexsort((features.items.ids, -counts))  # most popular first, ties by id
    # Popular candidates need a retrieval score on the same scale as two-tower ones: their
    # cosine with the vector of a user the model knows nothing about.
    cold_user = cold_user_vector(two_tower)
    bundle = ModelBundle(
        version="",
        features=features,
        two_tower=two_tower,
        index=index,
        ranker=model,
        ranker_variant=trained_variant(config.ranker.rank),
        compressed_rankers=compressed,
        histories=histories,
        clusters=clusters,
        mixtures=mixtures,
        popular=PopularItems(
            "", features.items.ids[order], (vectors[order] @ cold_user).astype(np.float32)
        ),
        manifest={},
        neighbours=ItemNeighbours.build(interactions, features.items.ids, config.item_neighbours),
    )
    metrics = {
        "two_tower": two_tower_metrics,
        "ranker": ranker_metrics,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    return bundle, metrics


def build_interests(
    two_tower,
    features: FeatureSpace,
    histories: UserHistories,
    vectors: np.ndarray,
    config: KnnEmbedConfig,
):
    """kNN-Embed's parts: the item clusters, and every user's interests and neighbours' mixture."""
    clusters = ItemClusters.build(
        features.items.ids, vectors, config.clusters, config.kmeans_iterations, config.seed
    )
    mixtures = UserMixtures.build(
        histories,
        user_vectors(two_tower, features, histories),
        features.items.ids,
        clusters.assign(vectors),
        clusters.n_clusters,
        config,
    )
    return clusters, mixtures


@dataclass
class Validation:
    """What `service.evaluation.validate` found: `figures`, the choices and the figures
    behind them, recorded in the manifest (serving follows its choices); `ranker_lists`,
    the chosen retrieval's candidate lists for the held-out interactions, which the
    served ranker is trained on (None where too few held the item)."""

    figures: dict
    ranker_lists: CandidateLists | None


def train_and_save(
    dataset: Dataset,
    out: str,
    config: TrainConfig = TrainConfig(),
    validation: Validation | None = None,
):
    bundle, metrics = train(dataset, config, validation and validation.ranker_lists)
    return bundle.save(
        out,
        config=asdict(config),
        schema=dataset.schema(),
        metrics=metrics,
        validation=validation and validation.figures,
    )
