"""Experiments (A/B): users split by a salted hash of their id into arms, each arm naming
request defaults (strategy, candidates, kNN-Embed knobs, rules) and, in the embedded
service, an artifact version and a ranker variant served beside the default ones.

Assignment is sticky and needs no state: sha256("<salt>:<name>:<user id>") places the user
on [0, 1), and the arms take consecutive shares in proportion to their weights. Every
process, the gateway and the event path included, computes the same arm, so clicks are
attributed to the arm that served the user without a lookup.

Per arm: `recsys_experiment_requests_total{experiment, arm, degraded}`,
`recsys_experiment_request_duration_seconds{experiment, arm}` and
`recsys_experiment_events_total{experiment, arm, type}`: clicks over impressions by arm is
the CTR by arm (deploy/grafana's "CTR by arm" panel).
"""

import hashlib
import time

import numpy as np

from service.metrics import EXPERIMENT_EVENTS, EXPERIMENT_LATENCY, EXPERIMENT_REQUESTS
from service.pipeline.interface import Pipeline
from service.pipeline.served_log import ARM
from service.schemas import (
    Arm,
    CandidatesResponse,
    EventsRequest,
    Experiment,
    RecommendRequest,
    RecommendResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
)


class Assignment:
    """Which arm of `experiment` a user is in."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        weights = np.array([arm.weight for arm in experiment.arms], dtype=np.float64)
        self._bounds = np.cumsum(weights) / weights.sum()

    def place(self, user_id: int) -> float:
        key = f"{self.experiment.salt}:{self.experiment.name}:{user_id}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64

    def arm_of(self, user_id: int) -> Arm:
        index = int(np.searchsorted(self._bounds, self.place(user_id), side="right"))
        return self.experiment.arms[min(index, len(self.experiment.arms) - 1)]

    def count_events(self, request: EventsRequest) -> None:
        """Each accepted event to its user's arm."""
        for event in request.events:
            arm = self.arm_of(event.user_id)
            EXPERIMENT_EVENTS.labels(self.experiment.name, arm.name, event.type).inc()


def with_arm_defaults(request: RecommendRequest, arm: Arm) -> RecommendRequest:
    """The request with the arm's defaults where it leaves a field unset."""
    defaults = arm.request
    update = {
        field: getattr(defaults, field)
        for field in ("strategy", "candidates", "knn_embed")
        if getattr(request, field) is None and getattr(defaults, field) is not None
    }
    if defaults.rules is not None:
        update["rules"] = request.rules.over(defaults.rules) if request.rules else defaults.rules
    if "candidates" in update and update["candidates"] < request.k:
        update.pop("candidates")  # an arm's candidate count never refuses a larger k
    return request.model_copy(update=update) if update else request


def count_events(pipeline: Pipeline | None, request: EventsRequest) -> None:
    """Accepted events to their users' arms, where an experiment runs."""
    if isinstance(pipeline, ExperimentPipeline):
        pipeline.assignment.count_events(request)


class ExperimentPipeline:
    """A `Pipeline` over one per arm: each request goes to its user's arm, with the arm's
    defaults, and the answer (and the served-list log) says which."""

    def __init__(
        self,
        assignment: Assignment,
        default: Pipeline,
        by_arm: dict[str, Pipeline],
        owned: list[Pipeline] = (),
    ):
        """`by_arm`: the pipelines of arms that serve another version or ranker variant
        (others: `default`); `owned`: those to close with this one (a variant's pipeline
        shares the default's parts)."""
        self.assignment = assignment
        self.default = default
        self.by_arm = by_arm
        self.owned = list(owned)

    @property
    def name(self) -> str:
        return self.assignment.experiment.name

    @property
    def model_version(self) -> str:
        return self.default.model_version

    def _routed(self, request: RecommendRequest) -> tuple[Arm, RecommendRequest, Pipeline]:
        arm = self.assignment.arm_of(request.user_id)
        return arm, with_arm_defaults(request, arm), self.by_arm.get(arm.name, self.default)

    def _counted(self, arm: Arm, started: float, degraded: bool) -> None:
        EXPERIMENT_REQUESTS.labels(self.name, arm.name, str(degraded).lower()).inc()
        EXPERIMENT_LATENCY.labels(self.name, arm.name).observe(time.perf_counter() - started)

    def recommend(
        self, request: RecommendRequest, deadline: float | None = None
    ) -> RecommendResponse:
        started = time.perf_counter()
        arm, request, pipeline = self._routed(request)
        token = ARM.set((self.name, arm.name))
        try:
            answer = pipeline.recommend(request, deadline)
        finally:
            ARM.reset(token)
        self._counted(arm, started, answer.degraded)
        return answer.model_copy(update={"experiment": self.name, "arm": arm.name})

    def candidates(
        self, request: RecommendRequest, deadline: float | None = None
    ) -> CandidatesResponse:
        started = time.perf_counter()
        arm, request, pipeline = self._routed(request)
        answer = pipeline.candidates(request, deadline)
        self._counted(arm, started, answer.degraded)
        return answer.model_copy(update={"experiment": self.name, "arm": arm.name})

    def similar_items(
        self, request: SimilarItemsRequest, deadline: float | None = None
    ) -> SimilarItemsResponse:
        """No user, no arm: the default version answers."""
        return self.default.similar_items(request, deadline)

    def close(self) -> None:
        self.default.close()
        for pipeline in self.owned:
            pipeline.close()

    def __getattr__(self, name: str):
        """What else the transports and admin read of a pipeline (its bundle, catalog)."""
        return getattr(self.default, name)
