"""The one pipeline HTTP and gRPC both call: retrieve candidates, rank them, answer."""

from dataclasses import dataclass, replace

import numpy as np

from service.bundle import ModelBundle
from service.embeddings.artifact_tables import in_memory_store
from service.embeddings.store import EmbeddingStore
from service.online.recent import RecentItems
from service.metrics import CANDIDATES, COLD_START, DEGRADED, MODEL_INFO, STAGE_LATENCY
from service.ranking.models import ranker_name
from service.ranking.ranker import Ranker
from service.retrieval.generator import SOURCE_KNN_EMBED, SOURCE_POPULAR, SOURCE_TWO_TOWER, CandidateGenerator, Candidates
from service.retrieval.knn_embed import MixtureKnobs
from service.schemas import Candidate, CandidatesResponse, RankerInfo, RecommendRequest, RecommendResponse, ScoredItem


@dataclass(frozen=True)
class PipelineOptions:
    default_candidates: int = 200
    history_length: int = 50
    strategy: str = "two_tower"  # when a request names none
    knn_embed: MixtureKnobs = MixtureKnobs()


class RecommendPipeline:
    def __init__(
        self,
        bundle: ModelBundle,
        store: EmbeddingStore | None = None,
        options: PipelineOptions = PipelineOptions(),
        recent: RecentItems | None = None,
    ):
        """`store` holds the artifact's id vectors (by default an in-process one is filled);
        `recent` the users' items since the artifact was trained (none: the artifact's only)."""
        self.bundle = bundle
        self.options = options
        self.store = store = store if store is not None else in_memory_store(bundle)
        self.generator = CandidateGenerator(
            bundle.two_tower,
            bundle.index,
            store,
            bundle.histories,
            bundle.popular_items,
            bundle.popular_scores,
            min(options.history_length, bundle.two_tower.config.history_length),
            recent,
            bundle.clusters,
            options.knn_embed,
        )
        self.ranker = Ranker(bundle.ranker, bundle.features, 1.0 / bundle.two_tower.config.temperature)
        self.ranker_info = RankerInfo(model=ranker_name(bundle.ranker), variant=bundle.ranker_variant)
        MODEL_INFO.info(
            {"version": bundle.version, "retrieval": options.strategy, "ranker": self.ranker_info.model, "ranker_variant": self.ranker_info.variant}
        )

    @property
    def model_version(self) -> str:
        return self.bundle.version

    def _knobs(self, request: RecommendRequest) -> MixtureKnobs:
        if request.knn_embed is None:
            return self.options.knn_embed
        return replace(self.options.knn_embed, **request.knn_embed.model_dump(exclude_none=True))

    def _retrieve(self, request: RecommendRequest) -> Candidates:
        n = max(request.k, request.candidates or self.options.default_candidates)
        with STAGE_LATENCY.labels("retrieve").time():
            candidates = self.generator.generate(
                request.user_id,
                n,
                np.array(request.exclude_item_ids, dtype=np.uint64),
                request.strategy or self.options.strategy,
                self._knobs(request),
            )
        if all(s == SOURCE_POPULAR for s in candidates.sources):
            COLD_START.inc()
        for source in (SOURCE_TWO_TOWER, SOURCE_KNN_EMBED, SOURCE_POPULAR):
            CANDIDATES.labels(source).observe(sum(s == source for s in candidates.sources))
        if candidates.degraded:
            DEGRADED.labels("embedding_store").inc()
        return candidates

    def candidates(self, request: RecommendRequest) -> CandidatesResponse:
        found = self._retrieve(request)
        return CandidatesResponse(
            user_id=request.user_id,
            candidates=[
                Candidate(item_id=int(i), score=float(s), source=src, component=c)
                for i, s, src, c in zip(found.item_ids, found.scores, found.sources, found.components)
            ],
            degraded=found.degraded,
            model_version=self.model_version,
        )

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        found = self._retrieve(request)
        context = request.context
        with STAGE_LATENCY.labels("rank").time():
            scores = self.ranker.score(
                request.user_id,
                found.item_ids,
                found.scores,
                hour=context.hour if context else None,
                weekday=context.weekday if context else None,
            )
        order = np.lexsort((found.item_ids, -scores))[: request.k]  # by score, ties by id
        return RecommendResponse(
            user_id=request.user_id,
            items=[ScoredItem(item_id=int(found.item_ids[i]), score=float(scores[i])) for i in order],
            degraded=found.degraded,
            model_version=self.model_version,
            ranker=self.ranker_info,
        )
