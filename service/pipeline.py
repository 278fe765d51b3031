"""The one pipeline HTTP and gRPC both call: retrieve candidates, rank them, answer.

`RecommendPipeline` runs both stages in process (the embedded mode, and inside the retrieval
and ranking tiers); `service.api.remote.RemotePipeline` calls the tiers over gRPC and answers
through the same `candidates_response` and `ranked_response`."""

from dataclasses import dataclass, replace

import numpy as np

from service.bundle import ModelBundle, RankingParts
from service.embeddings.artifact_tables import in_memory_store
from service.embeddings.store import EmbeddingStore
from service.metrics import CANDIDATES, COLD_START, DEGRADED, MODEL_INFO, STAGE_LATENCY
from service.online.recent import RecentItems
from service.ranking.models import ranker_name
from service.ranking.ranker import Ranker
from service.retrieval.generator import (
    SOURCE_KNN_EMBED,
    SOURCE_POPULAR,
    SOURCE_TWO_TOWER,
    CandidateGenerator,
    Candidates,
)
from service.retrieval.knn_embed import MixtureKnobs
from service.schemas import (
    Candidate,
    CandidatesResponse,
    Context,
    RankerInfo,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
)


@dataclass(frozen=True)
class PipelineOptions:
    default_candidates: int = 200
    history_length: int = 50
    strategy: str = "two_tower"  # when a request names none
    knn_embed: MixtureKnobs = MixtureKnobs()


class RankingStage:
    """The artifact's ranker (the configured variant) over a request's candidates: the
    ranking tier's whole job, and the second stage in process."""

    def __init__(self, parts: RankingParts):
        self.model_version = parts.version
        self.ranker = Ranker(parts.ranker, parts.features, parts.score_scale)
        self.ranker_info = RankerInfo(model=ranker_name(parts.ranker), variant=parts.ranker_variant)

    def rank(self, user_id: int, item_ids: np.ndarray, retrieval_scores: np.ndarray, context: Context | None) -> np.ndarray:
        with STAGE_LATENCY.labels("rank").time():
            return self.ranker.score(
                user_id,
                item_ids,
                retrieval_scores,
                hour=context.hour if context else None,
                weekday=context.weekday if context else None,
            )


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
        self.ranking = RankingStage(bundle.ranking_parts)
        self.ranker_info = self.ranking.ranker_info
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

    def retrieve(self, request: RecommendRequest) -> Candidates:
        """The candidates, before ranking (what the retrieval tier answers)."""
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

    def candidates(self, request: RecommendRequest, deadline: float | None = None) -> CandidatesResponse:
        """`deadline` (monotonic seconds) is for remote pipelines; in process there is no wait."""
        return candidates_response(request.user_id, self.retrieve(request), self.model_version)

    def recommend(self, request: RecommendRequest, deadline: float | None = None) -> RecommendResponse:
        found = self.retrieve(request)
        scores = self.ranking.rank(request.user_id, found.item_ids, found.scores, request.context)
        return ranked_response(request, found, scores, self.model_version, self.ranker_info)

    def close(self) -> None:
        self.store.close()


def candidates_response(user_id: int, found: Candidates, model_version: str) -> CandidatesResponse:
    return CandidatesResponse(
        user_id=user_id,
        candidates=[
            Candidate(item_id=int(i), score=float(s), source=src, component=c)
            for i, s, src, c in zip(found.item_ids, found.scores, found.sources, found.components)
        ],
        degraded=found.degraded,
        model_version=model_version,
    )


def ranked_response(
    request: RecommendRequest, found: Candidates, scores: np.ndarray | None, model_version: str, ranker: RankerInfo | None, degraded: bool = False
) -> RecommendResponse:
    """The top `request.k` by ranker score (ties by id); with no `scores` (ranking fell
    back), the first k in retrieval order, `ranker` None."""
    if scores is None:
        order = np.arange(min(request.k, len(found.item_ids)))
        scores = found.scores
    else:
        order = np.lexsort((found.item_ids, -scores))[: request.k]
    return RecommendResponse(
        user_id=request.user_id,
        items=[ScoredItem(item_id=int(found.item_ids[i]), score=float(scores[i])) for i in order],
        degraded=found.degraded or degraded,
        model_version=model_version,
        ranker=ranker,
    )
