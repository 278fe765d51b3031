"""gRPC transport: recsys.v1.Recommender, grpc.health.v1 and server reflection.

Requests are validated by the same pydantic models as HTTP; a validation error becomes
INVALID_ARGUMENT with the same message.
"""

import time
from collections.abc import Callable
from concurrent import futures

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from service.metrics import REQUEST_LATENCY, REQUESTS
from service.online.runtime import OnlineLearning
from service.online.streams import EventLogUnavailable, accept_events
from service.pipeline import RecommendPipeline
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.schemas import EventsRequest, RecommendRequest

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
MAX_MESSAGE_BYTES = 1 << 20


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


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, pipeline: Callable[[], RecommendPipeline | None], online: Callable[[], OnlineLearning | None]):
        self._pipeline = pipeline
        self._online = online

    def _call(self, endpoint: str, context: grpc.ServicerContext, ready, parse, answer):
        """Metrics and status codes around one call: UNAVAILABLE before `ready()` gives what
        `answer` needs, INVALID_ARGUMENT when `parse` refuses the request."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
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
        except Exception:
            if code == grpc.StatusCode.OK:
                code = grpc.StatusCode.INTERNAL
            raise
        finally:
            REQUESTS.labels("grpc", endpoint, code.name).inc()
            REQUEST_LATENCY.labels("grpc", endpoint).observe(time.perf_counter() - started)

    def Recommend(self, request, context):
        def answer(pipeline: RecommendPipeline, parsed: RecommendRequest) -> pb.RecommendResponse:
            result = pipeline.recommend(parsed)
            return pb.RecommendResponse(
                user_id=result.user_id,
                items=[pb.ScoredItem(item_id=i.item_id, score=i.score) for i in result.items],
                degraded=result.degraded,
                model_version=result.model_version,
                ranker=None if result.ranker is None else pb.RankerInfo(model=result.ranker.model, variant=result.ranker.variant),
            )

        return self._call("Recommend", context, self._pipeline, lambda: request_from_proto(request), answer)

    def Candidates(self, request, context):
        def answer(pipeline: RecommendPipeline, parsed: RecommendRequest) -> pb.CandidatesResponse:
            result = pipeline.candidates(parsed)
            return pb.CandidatesResponse(
                user_id=result.user_id,
                candidates=[
                    pb.Candidate(item_id=c.item_id, score=c.score, source=c.source, component=c.component)
                    for c in result.candidates
                ],
                degraded=result.degraded,
                model_version=result.model_version,
            )

        return self._call("Candidates", context, self._pipeline, lambda: request_from_proto(request), answer)

    def SendEvents(self, request, context):
        def answer(online: OnlineLearning, parsed: EventsRequest) -> pb.SendEventsResponse:
            return pb.SendEventsResponse(accepted=accept_events(online.events, parsed).accepted)

        return self._call("SendEvents", context, self._online, lambda: events_from_proto(request), answer)


class GrpcServer:
    """The gRPC server with health (NOT_SERVING until the pipeline is ready) and reflection."""

    def __init__(
        self,
        pipeline: Callable[[], RecommendPipeline | None],
        online: Callable[[], OnlineLearning | None],
        address: str,
        workers: int = 8,
    ):
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 16 * MAX_MESSAGE_BYTES),
            ],
        )
        pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(pipeline, online), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(address)
        self.set_serving(False)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float = 5.0) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()
