"""What every recommendation pipeline answers, and the parts of the answer they share.

`Pipeline` is what the transports (HTTP, gRPC) call. Two implement it:
`service.pipeline.in_process.RecommendPipeline` runs retrieval and ranking in this process
(the embedded service, and inside the retrieval tier); `service.api.remote.RemotePipeline`
is the gateway's, calling the tiers over gRPC. Both size the candidate set, time their
stages, apply the business rules, log what they served and build their answers here, so
the two modes answer alike. No model library: a gateway imports this without loading one.
"""

import time
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from service.metrics import RULES_APPLIED, STAGE_LATENCY
from service.pipeline.rules import apply_rules
from service.pipeline.served_log import ARM, ServedList, ServedListLogger, new_request_id
from service.retrieval.candidates import Candidates
from service.retrieval.catalog import ItemCatalog
from service.schemas import (
    Candidate,
    CandidatesResponse,
    RankerInfo,
    RecommendRequest,
    RecommendResponse,
    Rules,
    ScoredItem,
    SimilarItemsRequest,
    SimilarItemsResponse,
)

# The stages, as `recsys_stage_duration_seconds` labels them.
RETRIEVE, RANK, SIMILAR = "retrieve", "rank", "similar_items"


class StageFailed(Exception):
    """A stage did not answer in time, at all, or with something usable: its fallback answers."""


class Pipeline(Protocol):
    """`deadline`: monotonic seconds by which the client wants the answer (None: the
    pipeline's default); a remote pipeline shares it out among its tiers."""

    @property
    def model_version(self) -> str: ...

    def recommend(
        self, request: RecommendRequest, deadline: float | None = None
    ) -> RecommendResponse: ...

    def candidates(
        self, request: RecommendRequest, deadline: float | None = None
    ) -> CandidatesResponse: ...

    def similar_items(
        self, request: SimilarItemsRequest, deadline: float | None = None
    ) -> SimilarItemsResponse:
        """Raises `service.schemas.UnknownItem` for an item the service has no vector for."""

    def close(self) -> None: ...


def timed(stage: str) -> AbstractContextManager:
    """Times a stage into `recsys_stage_duration_seconds{stage}`."""
    return STAGE_LATENCY.labels(stage).time()


def candidate_count(request: RecommendRequest, default: int) -> int:
    """Candidates to retrieve: the request's, else `default`, and never fewer than k."""
    return max(request.k, request.candidates or default)


def excluded_ids(request: RecommendRequest) -> np.ndarray:
    """The request's exclusions, sorted and distinct."""
    return np.unique(np.array(request.exclude_item_ids, dtype=np.uint64))


def log_served(
    logger: ServedListLogger | None,
    request: RecommendRequest,
    answer: RecommendResponse,
    found: Candidates,
) -> None:
    """The answer to the served-list log, each item with the source that found it (`pin`
    for a pinned item that was no candidate)."""
    if logger is None:
        return
    timestamp, (experiment, arm) = time.time(), ARM.get() or (None, None)

    def served() -> ServedList:  # made on the log's thread, off the request path
        source = dict(zip(found.item_ids.tolist(), found.sources.tolist()))
        ids = [item.item_id for item in answer.items]
        context = request.context.model_dump(exclude_none=True) if request.context else None
        return ServedList(
            request_id=answer.request_id,
            user_id=request.user_id,
            item_ids=ids,
            scores=[item.score for item in answer.items],
            sources=[str(source.get(i, "pin")) for i in ids],
            model_version=answer.model_version,
            rules=answer.rules,
            context=context,
            timestamp=timestamp,
            experiment=experiment,
            arm=arm,
        )

    logger.record(served, answer.request_id)


def candidates_response(user_id: int, found: Candidates, model_version: str) -> CandidatesResponse:
    return CandidatesResponse(
        request_id=new_request_id(),
        user_id=user_id,
        candidates=[
            Candidate(item_id=int(i), score=float(s), source=src, component=c)
            for i, s, src, c in zip(found.item_ids, found.scores, found.sources, found.components)
        ],
        degraded=found.degraded,
        model_version=model_version,
    )


def similar_response(
    request: SimilarItemsRequest,
    ids: np.ndarray,
    scores: np.ndarray,
    model_version: str,
    degraded: bool = False,
) -> SimilarItemsResponse:
    return SimilarItemsResponse(
        request_id=new_request_id(),
        item_id=request.item_id,
        items=[ScoredItem(item_id=int(i), score=float(s)) for i, s in zip(ids, scores)],
        degraded=degraded,
        model_version=model_version,
    )


def with_default_rules(request: RecommendRequest, defaults: Rules | None) -> RecommendRequest:
    """The request with its rules over the service's defaults (`RECSYS_RULES`)."""
    if defaults is None:
        return request
    rules = request.rules.over(defaults) if request.rules else defaults
    return request.model_copy(update={"rules": rules})


def needs_vectors(request: RecommendRequest) -> bool:
    """Whether the answer's rules need the candidates' item vectors (diversity)."""
    return bool(request.rules and request.rules.diversity)


def ranked_response(
    request: RecommendRequest,
    found: Candidates,
    scores: np.ndarray | None,
    model_version: str,
    ranker: RankerInfo | None,
    degraded: bool = False,
    catalog: ItemCatalog | None = None,
) -> RecommendResponse:
    """The top `request.k` by ranker score (ties by id); with no `scores` (ranking fell
    back), the first k in retrieval order, `ranker` None. With `request.rules` (the
    service's defaults already under them), the rules pick the answer from all
    candidates (`service.pipeline.rules`), over `catalog`'s attributes."""
    if request.rules is not None and catalog is not None and len(found):
        answer = apply_rules(
            found.item_ids,
            found.scores if scores is None else scores,
            request.k,
            request.rules,
            catalog,
            ranked=scores is not None,
            vectors=found.vectors,
        )
        for rule in answer.applied:
            RULES_APPLIED.labels(rule.partition(":")[0]).inc()
        return RecommendResponse(
            request_id=new_request_id(),
            user_id=request.user_id,
            items=[
                ScoredItem(item_id=int(i), score=float(s))
                for i, s in zip(answer.item_ids, answer.scores)
            ],
            degraded=found.degraded or degraded,
            model_version=model_version,
            ranker=ranker,
            rules=answer.applied,
        )
    if scores is None:
        order = np.arange(min(request.k, len(found.item_ids)))
        scores = found.scores
    else:
        order = np.lexsort((found.item_ids, -scores))[: request.k]
    return RecommendResponse(
        request_id=new_request_id(),
        user_id=request.user_id,
        items=[ScoredItem(item_id=int(found.item_ids[i]), score=float(scores[i])) for i in order],
        degraded=found.degraded or degraded,
        model_version=model_version,
        ranker=ranker,
    )
