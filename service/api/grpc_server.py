"""gRPC transport: recsys.v1.Recommender (the gateway), recsys.v1.Retrieval and
recsys.v1.Ranking (the tiers), grpc.health.v1 and server reflection.

Requests are validated by the same pydantic models as HTTP (`service.api.codec`); a
validation error becomes INVALID_ARGUMENT with the same message. Each method reads top to
bottom: what it needs loaded, the parsed request, the pipeline call, the answer.
"""

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from service.api import codec
from service.api.served import Served
from service.metrics import REQUEST_LATENCY, REQUESTS
from service.online.streams import EventLogUnavailable, accept_events
from service.pipeline.experiments import count_events
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.schemas import InvalidFilter, UnknownItem

T = TypeVar("T")

MAX_MESSAGE_BYTES = 1 << 20
MAX_CONNECTION_AGE_MS = 60_000


class Refused(Exception):
    """A call refused with a status code and this message."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(Refused):
    """The request is unusable (it fails validation, a file it names is missing, ...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotLoaded(Refused):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(Refused):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(Refused):
    code = grpc.StatusCode.NOT_FOUND


@contextmanager
def answering(endpoint: str, context: grpc.ServicerContext) -> Iterator[None]:
    """Metrics and status codes around one call: a `Refused` becomes its code and message,
    a filter on an attribute the catalog lacks INVALID_ARGUMENT, an event log that cannot
    take events UNAVAILABLE (retry), anything else INTERNAL."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        try:
            yield
        except Refused as exc:
            code = exc.code
            context.abort(code, str(exc))
        except InvalidFilter as exc:  # a filter the catalog cannot meet: the caller's to fix
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(exc))
        except EventLogUnavailable as exc:
            code = grpc.StatusCode.UNAVAILABLE
            context.abort(code, f"{exc}; no event of the request was appended, retry")
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
    finally:
        REQUESTS.labels("grpc", endpoint, code.name).inc()
        REQUEST_LATENCY.labels("grpc", endpoint).observe(time.perf_counter() - started)


def loaded(part: T | None) -> T:
    """`part` of what the process serves, or UNAVAILABLE until it is loaded."""
    if part is None:
        raise NotLoaded("models are not loaded yet")
    return part


def validated(parse: Callable[..., T], *args, **kwargs) -> T:
    """`parse(...)`, a validation error as INVALID_ARGUMENT naming the fields."""
    try:
        return parse(*args, **kwargs)
    except ValidationError as exc:
        raise InvalidArgument(
            "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
                for e in exc.errors()
            )
        ) from None


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The client's deadline as monotonic seconds, None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def similar_items(
    served: Served, request: pb.SimilarItemsRequest, context
) -> pb.SimilarItemsResponse:
    """What both services' SimilarItems answer: the served pipeline's, NOT_FOUND for an item
    it has no vector for."""
    pipeline = loaded(served.pipeline)
    parsed = validated(codec.similar_request_from_proto, request)
    try:
        answer = pipeline.similar_items(parsed, deadline_of(context))
    except UnknownItem as exc:
        raise NotFound(str(exc)) from None
    return codec.similar_response_to_proto(answer)


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """The gateway's service: over the embedded pipeline or the remote one."""

    service = "Recommender"

    def __init__(self, served: Served):
        self.served = served

    def Recommend(
        self, request: pb.RecommendRequest, context: grpc.ServicerContext
    ) -> pb.RecommendResponse:
        with answering("Recommend", context):
            pipeline = loaded(self.served.pipeline)
            parsed = validated(codec.request_from_proto, request)
            return codec.recommend_response_to_proto(
                pipeline.recommend(parsed, deadline_of(context))
            )

    def Candidates(
        self, request: pb.RecommendRequest, context: grpc.ServicerContext
    ) -> pb.CandidatesResponse:
        with answering("Candidates", context):
            pipeline = loaded(self.served.pipeline)
            parsed = validated(codec.request_from_proto, request)
            return codec.candidates_to_proto(pipeline.candidates(parsed, deadline_of(context)))

    def SendEvents(
        self, request: pb.SendEventsRequest, context: grpc.ServicerContext
    ) -> pb.SendEventsResponse:
        with answering("SendEvents", context):
            online = loaded(self.served.online)
            parsed = validated(codec.events_from_proto, request)
            accepted = accept_events(online.events, parsed).accepted
            count_events(self.served.pipeline, parsed)
            return pb.SendEventsResponse(accepted=accepted)

    def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: grpc.ServicerContext
    ) -> pb.SimilarItemsResponse:
        with answering("SimilarItems", context):
            return similar_items(self.served, request, context)


class RetrievalServicer(pb_grpc.RetrievalServicer):
    """The candidate-generation tier over its in-process pipeline."""

    service = "Retrieval"

    def __init__(self, served: Served):
        self.served = served

    def Retrieve(
        self, request: pb.RecommendRequest, context: grpc.ServicerContext
    ) -> pb.RetrieveResponse:
        with answering("Retrieve", context):
            pipeline = loaded(self.served.pipeline)
            parsed = validated(codec.request_from_proto, request)
            return codec.candidates_to_columns(pipeline.retrieve(parsed), pipeline.model_version)

    def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: grpc.ServicerContext
    ) -> pb.SimilarItemsResponse:
        with answering("SimilarItems", context):
            return similar_items(self.served, request, context)


class RankingServicer(pb_grpc.RankingServicer):
    """The ranking tier: the artifact's ranker over the candidates it is sent."""

    service = "Ranking"

    def __init__(self, served: Served):
        self.served = served

    def Rank(self, request: pb.RankRequest, context: grpc.ServicerContext) -> pb.RankResponse:
        with answering("Rank", context):
            ranking = loaded(self.served.ranking)
            with ranking.expecting():
                parsed = validated(codec.rank_request_from_proto, request)
                ids = np.array(parsed.item_ids, dtype=np.uint64)
                scores = ranking.rank(
                    parsed.user_id,
                    ids,
                    np.array(parsed.retrieval_scores, np.float32),
                    parsed.context,
                )
            return pb.RankResponse(
                scores=scores.tolist(),
                ranker=codec.ranker_to_proto(ranking.ranker_info),
                model_version=ranking.model_version,
            )


class MalformedRequests(grpc.ServerInterceptor):
    """Bytes that do not parse as the method's request message get INVALID_ARGUMENT with the
    parser's reason (grpcio itself answers INTERNAL): the handler parses them itself."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler  # streams (health Watch) and unknown methods as grpcio serves them
        parse, behaviour, method = (
            handler.request_deserializer,
            handler.unary_unary,
            handler_call_details.method,
        )

        def parsed_then_served(raw: bytes, context):
            try:
                request = parse(raw)
            except DecodeError as exc:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method} request: {exc}"
                )
            return behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            parsed_then_served, response_serializer=handler.response_serializer
        )


class GrpcServer:
    """A gRPC server for the given services, with health (NOT_SERVING until `set_serving`)
    and reflection: the gateway's Recommender, or a tier's Retrieval or Ranking."""

    def __init__(
        self, services: list, address: str, workers: int = 8, max_in_flight: int | None = None
    ):
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
                # Workers of one box share the port (`recsys serve --workers`).
                ("grpc.so_reuseport", 1),
            ],
        )
        self.names = []
        for servicer in services:
            getattr(pb_grpc, f"add_{servicer.service}Servicer_to_server")(servicer, self.server)
            self.names.append(pb.DESCRIPTOR.services_by_name[servicer.service].full_name)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                *self.names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = self.server.add_insecure_port(address)
        self.set_serving(False)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
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
