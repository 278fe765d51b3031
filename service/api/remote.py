"""The gateway's pipeline in distributed mode: the retrieval and ranking tiers over gRPC.

Every request has a deadline: the client's (cut to `max_deadline_seconds`) or
`default_deadline_seconds`. Retrieval may use `retrieval_deadline_share` of it, ranking what
is left, so the answer is never later than the deadline. A read is tried up to
`CALL_ATTEMPTS` times, and again only when the tier refused it unrun (UNAVAILABLE, or
CANCELLED from a server that is stopping) and time remains: reads change nothing, so another
try is safe. Each tier has a circuit breaker: after
`BREAKER_FAILURES` failures in a row its calls fail at once for `BREAKER_RESET_SECONDS`, then
one trial call decides. When a stage fails or runs out of time its fallback answers and the
response says `degraded`: no candidates -> the artifact's popular items (minus exclusions);
no ranking -> the candidates in retrieval order, `ranker` null.
"""

import json
import logging
import time

import grpc
import numpy as np

from service.api import codec
from service.breaker import OPEN, BreakerOpen, CircuitBreaker
from service.metrics import DEGRADED, TIER_BREAKER_OPEN
from service.pipeline.interface import (
    RANK,
    RETRIEVE,
    SIMILAR,
    StageFailed,
    candidate_count,
    candidates_response,
    excluded_ids,
    log_served,
    ranked_response,
    similar_response,
    timed,
    with_default_rules,
)
from service.pipeline.served_log import ServedListLogger
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.candidates import Candidates
from service.retrieval.catalog import ItemCatalog
from service.retrieval.popular import PopularItems
from service.schemas import (
    CandidatesResponse,
    RecommendRequest,
    RecommendResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
    UnknownItem,
)
from service.settings import Settings

log = logging.getLogger(__name__)

BREAKER_FAILURES = 5
BREAKER_RESET_SECONDS = 2.0
MIN_CALL_SECONDS = 0.002  # less time than this left: do not start a call
RECONNECT_BACKOFF_MS = 1000
CALL_ATTEMPTS = 3  # a call refused unrun is tried again, on a replica picked anew

# Spread calls over every address the target resolves to (`dns:///` names a headless Service's
# pods, `ipv4:a:p,b:p` lists them). A replica that stops sends GOAWAY: new calls go to the
# others. A call that raced the GOAWAY is refused unrun (UNAVAILABLE, or CANCELLED from the
# stopping server); gRPC's retry policy tries it again after a few milliseconds, by which
# time the balancer has dropped that connection, and only while the deadline allows. One
# immediate retry was not enough: it could pick the stopping replica again. (No client-side
# health checking: its Watch streams would count against each tier's in-flight limit, and
# grpcio aborts now and then at exit while one is open.)
TIER_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": CALL_ATTEMPTS,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.05s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ],
    }
)


class Tier:
    """One downstream tier: its channel (balanced, retrying calls refused unrun), its breaker."""

    def __init__(self, name: str, address: str):
        self.name = name
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.service_config", TIER_SERVICE_CONFIG),
                # A replica that was away is tried again within a second, not after minutes of backoff.
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ],
        )
        gauge = TIER_BREAKER_OPEN.labels(name)
        gauge.set(0)
        self.breaker = CircuitBreaker(
            name,
            BREAKER_FAILURES,
            BREAKER_RESET_SECONDS,
            lambda state: gauge.set(state == OPEN),
            counts=(grpc.RpcError,),
        )

    def read(self, method, message, until: float):
        timeout = until - time.monotonic()
        if timeout < MIN_CALL_SECONDS:
            raise StageFailed(f"{self.name}: no time left")
        try:
            return self.breaker.call(method, message, timeout=timeout)
        except BreakerOpen as exc:
            raise StageFailed(f"{self.name}: breaker open") from exc
        except grpc.RpcError as exc:
            raise StageFailed(f"{self.name}: {exc.code().name}") from exc

    def close(self) -> None:
        self.channel.close()


class RemotePipeline:
    """The `Pipeline` the gateway serves: the tiers over gRPC, each stage within its share of
    the deadline, falling back when a tier fails."""

    def __init__(
        self,
        settings: Settings,
        popular: PopularItems,
        catalog: ItemCatalog,
        ranks: bool = True,
        served_log: ServedListLogger | None = None,
    ):
        """`catalog`: the catalog (kept current by the catalog feed), to refuse a filter the
        tier would refuse (a refusal is no tier failure) and to keep the fallback's popular
        items to the filter and off hidden items; `ranks`: whether
        answers are ranked (`service.artifacts.ranker_serves`); if not, the ranking tier is
        not called and answers keep retrieval order; `served_log`: where answers are logged."""
        self.served_log = served_log
        self.settings = settings
        self.popular = popular
        self.catalog = catalog
        self.ranks = ranks
        self.retrieval = Tier("retrieval", settings.retrieval_address)
        self.ranking = Tier("ranking", settings.ranking_address)
        self._retrieve_stub = pb_grpc.RetrievalStub(self.retrieval.channel).Retrieve
        self._rank_stub = pb_grpc.RankingStub(self.ranking.channel).Rank
        self._similar_stub = pb_grpc.RetrievalStub(self.retrieval.channel).SimilarItems
        self.model_version = popular.version  # until the retrieval tier names its own

    def _until(self, deadline: float | None) -> float:
        now = time.monotonic()
        budget = self.settings.default_deadline_seconds if deadline is None else deadline - now
        return now + min(max(budget, 0.0), self.settings.max_deadline_seconds)

    def _retrieve(self, request: RecommendRequest, until: float) -> Candidates:
        allowed = self.catalog.allowed(request.filter)  # InvalidFilter before any call
        share = self.settings.retrieval_deadline_share
        stage_until = time.monotonic() + (until - time.monotonic()) * share
        with timed(RETRIEVE):
            try:
                answer = self.retrieval.read(
                    self._retrieve_stub, codec.request_to_proto(request), stage_until
                )
                found = codec.candidates_from_columns(answer)
            except StageFailed as exc:
                log.warning("retrieval fell back to popular items: %s", exc)
                DEGRADED.labels("retrieval").inc()
                fallback = self.popular.top(
                    candidate_count(request, self.settings.default_candidates),
                    np.union1d(excluded_ids(request), self.catalog.blocked),
                    allowed,
                )
                fallback.degraded = True
                return fallback
        self.model_version = answer.model_version
        return found

    def candidates(
        self, request: RecommendRequest, deadline: float | None = None
    ) -> CandidatesResponse:
        return candidates_response(
            request.user_id, self._retrieve(request, self._until(deadline)), self.model_version
        )

    def recommend(
        self, request: RecommendRequest, deadline: float | None = None
    ) -> RecommendResponse:
        """The tiers' answer, under the request's rules over the gateway's defaults (sent
        on to retrieval as they are, so that it adds the vectors diversity needs)."""
        request = with_default_rules(request, self.settings.rules)
        until = self._until(deadline)
        found = self._retrieve(request, until)
        answer = self._ranked(request, found, until)
        log_served(self.served_log, request, answer, found)
        return answer

    def _ranked(self, request: RecommendRequest, found: Candidates, until: float):
        if not len(found) or not self.ranks:
            return ranked_response(
                request, found, None, self.model_version, None, catalog=self.catalog
            )
        with timed(RANK):
            try:
                ranked = self.ranking.read(
                    self._rank_stub, codec.rank_request_to_proto(request, found), until
                )
            except StageFailed as exc:
                log.warning("ranking fell back to retrieval order: %s", exc)
                DEGRADED.labels("ranking").inc()
                return ranked_response(
                    request, found, None, self.model_version, None, True, self.catalog
                )
        scores = np.array(ranked.scores, np.float32)
        ranker = codec.ranker_from_proto(ranked.ranker)
        return ranked_response(
            request, found, scores, self.model_version, ranker, catalog=self.catalog
        )

    def similar_items(
        self, request: SimilarItemsRequest, deadline: float | None = None
    ) -> SimilarItemsResponse:
        """The retrieval tier's answer; an item it has no vector for is NOT_FOUND there and
        `UnknownItem` here; a tier that fails answers popular items, `degraded`."""
        allowed = self.catalog.allowed(request.filter)
        with timed(SIMILAR):
            try:
                answer = self.retrieval.read(
                    self._similar_or_not_found,
                    codec.similar_request_to_proto(request),
                    self._until(deadline),
                )
            except StageFailed as exc:
                log.warning("similar items fell back to popular items: %s", exc)
                DEGRADED.labels("retrieval").inc()
                left_out = np.union1d(np.array([request.item_id], np.uint64), self.catalog.blocked)
                found = self.popular.top(request.k, left_out, allowed)
                return similar_response(
                    request, found.item_ids, found.scores, self.model_version, degraded=True
                )
        if isinstance(answer, grpc.RpcError):
            raise UnknownItem(answer.details())
        return codec.similar_response_from_proto(answer)

    def _similar_or_not_found(self, message, timeout: float):
        """The tier's answer, or its NOT_FOUND returned: a healthy tier's answer about the
        item, which must not count toward its breaker."""
        try:
            return self._similar_stub(message, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return exc
            raise

    def close(self) -> None:
        if self.served_log is not None:
            self.served_log.close()
        self.retrieval.close()
        self.ranking.close()
