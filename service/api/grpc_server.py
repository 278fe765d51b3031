"""gRPC transport: recsys.v1.Recommender (the gateway), recsys.v1.Retrieval and
recsys.v1.Ranking (the tiers), grpc.health.v1 and server reflection.

Requests are validated by the same pydantic models as HTTP; a validation error becomes
INVALID_ARGUMENT with the same message.
"""

import time
from collections.abc import Callable
from concurrent import futures

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from service.metrics import REQUEST_LATENCY, REQUESTS
from service.online.runtime import OnlineLearning
from service.online.streams import EventLogUnavailable, accept_events
from service.pipeline import RankingStage, RecommendPipeline
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.generator import Candidates
from service.schemas import (
    CandidatesResponse,
    EventsRequest,
    RankerInfo,
    RankRequest,
    RecommendRequest,
)

MAX_MESSAGE_BYTES = 1 << 20
MAX_CONNECTION_AGE_MS = 60_000


def request_from_proto(message: pb.RecommendRequest) -> RecommendRequest:
    fields = MessageToDict(message, preserving_proto_field_name=True)
    # proto3 JSON writes 64-bit integers as strings; the contract takes integers.
    fields["user_id"] = message.user_id
    fields["exclude_item_ids"] = list(message.exclude_item_ids)
    if not message.strategy:
        fields.pop("strategy", None)
    return RecommendRequest.model_validate(fields)


def events_from_proto(message: pb.SendEventsRequest) -> EventsRequest:
    return EventsRequest.model_validate({
        "events": [
            {
                "user_id": e.user_id,
                "item_id": e.item_id,
                "type": e.type,
                **({"timestamp": e.timestamp.seconds + e.timestamp.nanos / 1e9} if e.HasField("timestamp") else {}),
            }
            for e in message.events
        ]
    })


def _validation_message(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in error.errors()
    )


class InvalidArgument(Exception):
    """`answer` found the request unusable (a file it names is missing, say): INVALID_ARGUMENT."""


def serve_call(endpoint: str, context: grpc.ServicerContext, ready, parse, answer, authorized=lambda: True):
    """Metrics and status codes around one call: UNAUTHENTICATED unless `authorized()`,
    UNAVAILABLE before `ready()` gives what `answer` needs, INVALID_ARGUMENT when `parse`
    refuses the request or `answer` raises `InvalidArgument`."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        if not authorized():
            code = grpc.StatusCode.UNAUTHENTICATED
            context.abort(code, "this call needs `authorization: Bearer <RECSYS_ADMIN_TOKEN>` metadata")
        resource = ready()
        if resource is None:
            code = grpc.StatusCode.UNAVAILABLE
            context.abort(code, "models are not loaded yet")
        try:
            parsed = parse()
        except ValidationError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, _validation_message(exc))
        try:
            return answer(resource, parsed)
        except EventLogUnavailable as exc:
            code = grpc.StatusCode.UNAVAILABLE
            context.abort(code, f"{exc}; no event of the request was appended, retry")
        except InvalidArgument as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(exc))
    except Exception:
        if code == grpc.StatusCode.OK:
            code = grpc.StatusCode.INTERNAL
        raise
    finally:
        REQUESTS.labels("grpc", endpoint, code.name).inc()
        REQUEST_LATENCY.labels("grpc", endpoint).observe(time.perf_counter() - started)


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The client's deadline as monotonic seconds, None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def candidates_to_proto(result: CandidatesResponse) -> pb.CandidatesResponse:
    return pb.CandidatesResponse(
        user_id=result.user_id,
        candidates=[pb.Candidate(item_id=c.item_id, score=c.score, source=c.source, component=c.component) for c in result.candidates],
        degraded=result.degraded,
        model_version=result.model_version,
    )


def candidates_to_columns(found: Candidates, model_version: str) -> pb.RetrieveResponse:
    names, codes = np.unique(found.sources.astype(str), return_inverse=True)
    components = np.array([-1 if c is None else c for c in found.components], dtype=np.int32)
    return pb.RetrieveResponse(
        item_ids=found.item_ids.tolist(), scores=found.scores.tolist(), sources=codes.tolist(),
        source_names=names.tolist(), components=components.tolist(), degraded=found.degraded, model_version=model_version,
    )


def ranker_to_proto(ranker: RankerInfo | None) -> pb.RankerInfo | None:
    return None if ranker is None else pb.RankerInfo(model=ranker.model, variant=ranker.variant)


def rank_request_from_proto(message: pb.RankRequest) -> RankRequest:
    return RankRequest.model_validate({
        "user_id": message.user_id,
        "context": MessageToDict(message.context, preserving_proto_field_name=True) if message.HasField("context") else None,
        "item_ids": list(message.item_ids),
        "retrieval_scores": list(message.retrieval_scores),
    })


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """The gateway's service: over an in-process pipeline (embedded) or a remote one."""

    service = "Recommender"

    def __init__(self, pipeline: Callable[[], RecommendPipeline | None], online: Callable[[], OnlineLearning | None]):
        self._pipeline = pipeline
        self._online = online

    def Recommend(self, request, context):
        def answer(pipeline: RecommendPipeline, parsed: RecommendRequest) -> pb.RecommendResponse:
            result = pipeline.recommend(parsed, deadline_of(context))
            return pb.RecommendResponse(
                user_id=result.user_id,
                items=[pb.ScoredItem(item_id=i.item_id, score=i.score) for i in result.items],
                degraded=result.degraded,
                model_version=result.model_version,
                ranker=ranker_to_proto(result.ranker),
            )

        return serve_call("Recommend", context, self._pipeline, lambda: request_from_proto(request), answer)

    def Candidates(self, request, context):
        def answer(pipeline: RecommendPipeline, parsed: RecommendRequest) -> pb.CandidatesResponse:
            return candidates_to_proto(pipeline.candidates(parsed, deadline_of(context)))

        return serve_call("Candidates", context, self._pipeline, lambda: request_from_proto(request), answer)

    def SendEvents(self, request, context):
        def answer(online: OnlineLearning, parsed: EventsRequest) -> pb.SendEventsResponse:
            return pb.SendEventsResponse(accepted=accept_events(online.events, parsed).accepted)

        return serve_call("SendEvents", context, self._online, lambda: events_from_proto(request), answer)


class RetrievalServicer(pb_grpc.RetrievalServicer):
    """The candidate-generation tier over its in-process pipeline."""

    service = "Retrieval"

    def __init__(self, pipeline: Callable[[], RecommendPipeline | None]):
        self._pipeline = pipeline

    def Retrieve(self, request, context):
        def answer(pipeline: RecommendPipeline, parsed: RecommendRequest) -> pb.RetrieveResponse:
            return candidates_to_columns(pipeline.retrieve(parsed), pipeline.model_version)

        return serve_call("Retrieve", context, self._pipeline, lambda: request_from_proto(request), answer)


class RankingServicer(pb_grpc.RankingServicer):
    """The ranking tier: the artifact's ranker over the candidates it is sent."""

    service = "Ranking"

    def __init__(self, ranking: Callable[[], RankingStage | None]):
        self._ranking = ranking

    def Rank(self, request, context):
        def answer(ranking: RankingStage, parsed: RankRequest) -> pb.RankResponse:
            ids = np.array(parsed.item_ids, dtype=np.uint64)
            scores = ranking.rank(parsed.user_id, ids, np.array(parsed.retrieval_scores, np.float32), parsed.context)
            return pb.RankResponse(scores=scores.tolist(), ranker=ranker_to_proto(ranking.ranker_info), model_version=ranking.model_version)

        return serve_call("Rank", context, self._ranking, lambda: rank_request_from_proto(request), answer)


class MalformedRequests(grpc.ServerInterceptor):
    """Bytes that do not parse as the method's request message get INVALID_ARGUMENT with the
    parser's reason (grpcio itself answers INTERNAL): the handler parses them itself."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler  # streams (health Watch) and unknown methods as grpcio serves them
        parse, behaviour, method = handler.request_deserializer, handler.unary_unary, handler_call_details.method

        def parsed_then_served(raw: bytes, context):
            try:
                request = parse(raw)
            except DecodeError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method} request: {exc}")
            return behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(parsed_then_served, response_serializer=handler.response_serializer)


class GrpcServer:
    """A gRPC server for the given services, with health (NOT_SERVING until `set_serving`)
    and reflection: the gateway's Recommender, or a tier's Retrieval or Ranking."""

    def __init__(self, services: list, address: str, workers: int = 8, max_in_flight: int | None = None):
        """`services`: the servicers (RecommenderServicer, RetrievalServicer, RankingServicer);
        `max_in_flight`: calls at once, queued or running, beyond which gRPC answers
        RESOURCE_EXHAUSTED at once (load shedding; gRPC counts these, not /metrics)."""
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=max_in_flight,
            interceptors=[MalformedRequests()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 16 * MAX_MESSAGE_BYTES),
                # Clients reconnect now and then, and so resolve their target again: a gateway
                # balancing over a headless Service finds the replicas added since.
                ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
                ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_MS),
            ],
        )
        self.names = []
        for servicer in services:
            getattr(pb_grpc, f"add_{servicer.service}Servicer_to_server")(servicer, self.server)
            self.names.append(pb.DESCRIPTOR.services_by_name[servicer.service].full_name)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self.names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(address)
        self.set_serving(False)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.names):
            self.health.set(name, status)

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float = 5.0, notice: float = 0.0) -> None:
        """Health goes NOT_SERVING first and calls are still taken for `notice` seconds (probes
        see it before the port refuses), then in-flight calls get `grace` seconds to finish."""
        self.set_serving(False)
        if notice:
            time.sleep(notice)
        self.server.stop(grace).wait()
