"""The pipeline in process: retrieve candidates, rank them, answer (`Pipeline`).

`RecommendPipeline` runs both stages here: the embedded service, and the retrieval tier
(which answers its `retrieve`). `RankingStage` is the second stage alone: the ranking tier's
whole job."""

import logging
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import numpy as np

from service.artifact_tables import in_memory_store
from service.artifacts import RankerChoice, item_to_item_share, ranker_serves
from service.bundle import ModelBundle, RankingParts
from service.embeddings.recent_items import RecentItems
from service.embeddings.store import EmbeddingStore
from service.metrics import CANDIDATES, COLD_START, DEGRADED, MODEL_INFO
from service.pipeline.interface import (
    RANK,
    RETRIEVE,
    SIMILAR,
    candidate_count,
    candidates_response,
    log_served,
    needs_vectors,
    ranked_response,
    similar_response,
    timed,
    with_default_rules,
)
from service.pipeline.served_log import ServedListLogger
from service.ranking.batching import RankBatcher
from service.ranking.models import ranker_name
from service.ranking.ranker import Ranker, Runtime
from service.retrieval.candidates import (
    SOURCE_ITEM_TO_ITEM,
    SOURCE_KNN_EMBED,
    SOURCE_POPULAR,
    SOURCE_TWO_TOWER,
    Candidates,
)
from service.retrieval.catalog import ItemCatalog
from service.retrieval.generator import CandidateGenerator
from service.retrieval.knn_embed import MixtureKnobs
from service.retrieval.similar_items import item_vector, nearest_items
from service.schemas import (
    CandidatesResponse,
    Context,
    RankerInfo,
    RecommendRequest,
    RecommendResponse,
    Rules,
    SimilarItemsRequest,
    SimilarItemsResponse,
)
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    default_candidates: int = 200
    history_length: int = 50
    strategy: str = "two_tower"  # when a request names none
    knn_alpha: float | None = None  # kNN-Embed's request defaults: `mixture_knobs`
    knn_components: int = MixtureKnobs.components
    knn_reserved_share: float | None = None
    ranker: RankerChoice = "auto"  # `service.artifacts.ranker_serves`
    item_to_item_share: float | None = None  # `service.artifacts.item_to_item_share`
    filter_cache_mib: int = 256  # compiled filters kept (`service.retrieval.catalog`)
    rules: Rules | None = None  # requests' default rules (`service.pipeline.rules`)
    rank_batch_delay: float = 0.0  # seconds a forming ranking batch waits (`RankBatcher`)
    ranker_runtime: Runtime = "numpy"  # the ranker's forward (`service.ranking.ranker`)

    @classmethod
    def from_settings(cls, settings: Settings) -> "PipelineOptions":
        return cls(
            default_candidates=settings.default_candidates,
            history_length=settings.history_length,
            strategy=settings.strategy,
            knn_alpha=settings.knn_alpha,
            knn_components=settings.knn_components,
            knn_reserved_share=settings.knn_reserved_share,
            ranker=settings.ranker,
            item_to_item_share=settings.item_to_item_share,
            filter_cache_mib=settings.filter_cache_mib,
            rules=settings.rules,
            rank_batch_delay=settings.rank_batch_delay_ms / 1000,
            ranker_runtime=settings.ranker_runtime,
        )


def mixture_knobs(manifest: dict, options: PipelineOptions) -> MixtureKnobs:
    """kNN-Embed's request defaults: each option when given, else what `recsys train`'s
    validation chose, else the built-in default (an artifact trained without validation)."""
    chosen = manifest.get("validation", {}).get("choices", {}).get("knn_embed", {})
    alpha, reserved_share = options.knn_alpha, options.knn_reserved_share
    return MixtureKnobs(
        alpha=alpha if alpha is not None else chosen.get("alpha", MixtureKnobs.alpha),
        components=options.knn_components,
        reserved_share=(
            reserved_share
            if reserved_share is not None
            else chosen.get("reserved_share", MixtureKnobs.reserved_share)
        ),
    )


class RankingStage:
    """The artifact's ranker (the configured variant) over a request's candidates: the
    ranking tier's whole job, and the second stage in process. With a `batch_delay`
    (seconds), concurrent requests' candidates share forward passes (`RankBatcher`)."""

    def __init__(self, parts: RankingParts, batch_delay: float = 0.0, runtime: Runtime = "numpy"):
        self.model_version = parts.version
        self.ranker = Ranker(parts.ranker, parts.features, parts.score_scale, runtime)
        self.batcher = RankBatcher(self.ranker.forward, batch_delay) if batch_delay > 0 else None
        self.ranker_info = RankerInfo(model=ranker_name(parts.ranker), variant=parts.ranker_variant)
        # `recsys_model_info`'s ranker labels: which copy serves and what it measured.
        self.info = {
            "ranker": self.ranker_info.model,
            "ranker_variant": self.ranker_info.variant,
            "ranker_runtime": self.ranker.runtime,
            **parts.figures,
        }

    def rank(
        self,
        user_id: int,
        item_ids: np.ndarray,
        retrieval_scores: np.ndarray,
        context: Context | None,
    ) -> np.ndarray:
        with timed(RANK):
            if len(item_ids) == 0:
                return np.empty(0, dtype=np.float32)
            batch = self.ranker.encode(
                user_id,
                item_ids,
                retrieval_scores,
                hour=context.hour if context else None,
                weekday=context.weekday if context else None,
            )
            return self.ranker.forward(batch) if self.batcher is None else self.batcher.score(batch)

    def expecting(self) -> AbstractContextManager:
        """Around a request on its way to `rank`: a batch forming waits for it (briefly)."""
        return nullcontext() if self.batcher is None else self.batcher.expecting()


class RecommendPipeline:
    def __init__(
        self,
        bundle: ModelBundle,
        store: EmbeddingStore | None = None,
        options: PipelineOptions = PipelineOptions(),
        recent: RecentItems | None = None,
        served_log: ServedListLogger | None = None,
    ):
        """`store` holds the artifact's id vectors (by default an in-process one is filled);
        `recent` the users' items since the artifact was trained (none: the artifact's only);
        `served_log`: where answers are logged (none: not logged)."""
        self.served_log = served_log
        self.bundle = bundle
        self.options = options
        self.store = store = store if store is not None else in_memory_store(bundle)
        self.knobs = mixture_knobs(bundle.manifest, options)
        self.catalog = ItemCatalog.from_features(bundle.features, options.filter_cache_mib << 20)
        self.generator = CandidateGenerator(
            bundle.two_tower,
            bundle.index,
            store,
            bundle.histories,
            bundle.popular,
            min(options.history_length, bundle.two_tower.config.history_length),
            recent,
            bundle.clusters,
            self.knobs,
            bundle.neighbours,
            item_to_item_share(bundle.manifest, options.item_to_item_share),
            self.catalog,
        )
        self.ranking = RankingStage(
            bundle.ranking_parts, options.rank_batch_delay, options.ranker_runtime
        )
        self.ranker_info = self.ranking.ranker_info
        self.ranks = ranker_serves(bundle.manifest, options.ranker)
        if not self.ranks:
            log.info(
                "the ranker is off: answers keep retrieval order (RECSYS_RANKER=%s)", options.ranker
            )
        MODEL_INFO.info(
            {
                "version": bundle.version,
                "retrieval": options.strategy,
                **self.ranking.info,
            }
        )

    @property
    def model_version(self) -> str:
        return self.bundle.version

    def _knobs(self, request: RecommendRequest) -> MixtureKnobs:
        if request.knn_embed is None:
            return self.knobs
        return replace(self.knobs, **request.knn_embed.model_dump(exclude_none=True))

    def retrieve(self, request: RecommendRequest) -> Candidates:
        """The candidates, before ranking (what the retrieval tier answers); `InvalidFilter`
        for a filter on an attribute the catalog lacks. With diversity in the request's
        rules, the candidates carry their item vectors."""
        allowed = self.catalog.allowed(request.filter)
        with timed(RETRIEVE):
            candidates = self.generator.generate(
                request.user_id,
                candidate_count(request, self.options.default_candidates),
                np.array(request.exclude_item_ids, dtype=np.uint64),
                request.strategy or self.options.strategy,
                self._knobs(request),
                np.array(request.recent_item_ids, dtype=np.uint64),
                allowed,
            )
        counts = Counter(candidates.sources.tolist())  # in C: no Python loop per candidate
        if counts[SOURCE_POPULAR] == len(candidates.sources):
            COLD_START.inc()
        for source in (SOURCE_TWO_TOWER, SOURCE_KNN_EMBED, SOURCE_ITEM_TO_ITEM, SOURCE_POPULAR):
            CANDIDATES.labels(source).observe(counts[source])
        if candidates.degraded:
            DEGRADED.labels("embedding_store").inc()
        if needs_vectors(with_default_rules(request, self.options.rules)):
            candidates.vectors = self.generator.index.vectors_of(candidates.item_ids)
        return candidates

    def candidates(
        self, request: RecommendRequest, deadline: float | None = None
    ) -> CandidatesResponse:
        """`deadline` (monotonic seconds) is for remote pipelines; in process there is no wait."""
        return candidates_response(request.user_id, self.retrieve(request), self.model_version)

    def recommend(
        self, request: RecommendRequest, deadline: float | None = None
    ) -> RecommendResponse:
        request = with_default_rules(request, self.options.rules)
        if not self.ranks:  # the artifact's validation: the ranker would make answers worse
            found = self.retrieve(request)
            answer = ranked_response(
                request, found, None, self.model_version, None, catalog=self.catalog
            )
        else:
            with self.ranking.expecting():
                found = self.retrieve(request)
                scores = self.ranking.rank(
                    request.user_id, found.item_ids, found.scores, request.context
                )
            answer = ranked_response(
                request, found, scores, self.model_version, self.ranker_info, catalog=self.catalog
            )
        log_served(self.served_log, request, answer, found)
        return answer

    def similar_items(
        self, request: SimilarItemsRequest, deadline: float | None = None
    ) -> SimilarItemsResponse:
        allowed = self.catalog.allowed(request.filter)
        with timed(SIMILAR):
            try:
                vector, degraded = item_vector(
                    self.bundle.two_tower, self.catalog, self.store, request.item_id
                )
            except ConnectionError:  # a new item's row could not be read: popular items
                DEGRADED.labels("embedding_store").inc()
                left_out = np.union1d(np.array([request.item_id], np.uint64), self.catalog.blocked)
                found = self.bundle.popular.top(request.k, left_out, allowed)
                return similar_response(
                    request, found.item_ids, found.scores, self.model_version, degraded=True
                )
            ids, scores = nearest_items(
                self.generator.index,
                vector,
                request.item_id,
                request.k,
                allowed,
                self.catalog.blocked,
            )
        if degraded:
            DEGRADED.labels("embedding_store").inc()
        return similar_response(request, ids, scores, self.model_version, degraded)

    def close(self) -> None:
        if self.served_log is not None:
            self.served_log.close()
        self.store.close()
