"""HTTP/JSON transport (FastAPI). Handlers stay thin: validate, call the pipeline, answer."""

import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from service.metrics import REQUEST_LATENCY, REQUESTS, SHED
from service.online.streams import EventLog, EventLogUnavailable, accept_events
from service.pipeline import RecommendPipeline
from service.schemas import (
    CandidatesResponse,
    EventsRequest,
    EventsResponse,
    RecommendRequest,
    RecommendResponse,
)


def get_pipeline(request: Request) -> RecommendPipeline:
    pipeline = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise HTTPException(status_code=503, detail="models are not loaded yet")
    return pipeline


def get_event_log(request: Request) -> EventLog:
    online = getattr(request.app.state, "online", None)
    if online is None:
        raise HTTPException(status_code=503, detail="the event log is not open yet")
    return online.events


def get_deadline(
    # `float`, not `float | None`: a header is a number or absent, never null, and the schema says so.
    timeout_ms: Annotated[
        float,
        Header(alias="X-Deadline-Ms", gt=0, le=60_000, description="How long the client waits, in milliseconds; the "
               "gateway answers within it (cut to RECSYS_MAX_DEADLINE_SECONDS). Unset: RECSYS_DEFAULT_DEADLINE_SECONDS."),
    ] = None,
) -> float | None:
    """The client's deadline as monotonic seconds (what gRPC clients send as grpc-timeout)."""
    return None if timeout_ms is None else time.monotonic() + timeout_ms / 1000


PipelineDep = Annotated[RecommendPipeline, Depends(get_pipeline)]
DeadlineDep = Annotated[float | None, Depends(get_deadline)]
EventLogDep = Annotated[EventLog, Depends(get_event_log)]


def json_response(answer: BaseModel) -> Response:
    """The pipeline's answer, already a validated model, serialised once: returning the model
    would have FastAPI validate it again against `response_model` (which still documents it)."""
    return Response(answer.model_dump_json(), media_type="application/json")


class RequestMetrics:
    """Counts and times every HTTP request by route and status (plain ASGI: Starlette's
    BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            REQUESTS.labels("http", endpoint, str(status[0])).inc()
            REQUEST_LATENCY.labels("http", endpoint).observe(time.perf_counter() - started)


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413: by Content-Length before reading,
    or while reading a body sent without one (chunked), so a large body is never buffered."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = JSONResponse({"detail": f"request body over {self.limit} bytes"}, 413)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await refusal(scope, receive, send)
        received, refused = 0, False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not refused:
                refused = True
                await refusal(scope, receive, send)
                raise BodyTooLarge()
            return message

        async def send_unless_refused(message):
            if not refused:  # the app's own answer to the aborted read is dropped
                await send(message)

        try:
            await self.app(scope, counting_receive, send_unless_refused)
        except BodyTooLarge:
            pass


class BodyTooLarge(Exception):
    """The body went over the limit while being read (already answered with 413)."""


class InFlightLimit:
    """Load shedding: at most `limit` /v1/ requests at once; the next ones get 429 with
    Retry-After at once, instead of waiting in a queue past their deadline. Health and
    metrics are not limited. (One event loop runs this, so a plain counter is safe.)"""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            SHED.labels("http").inc()
            refusal = JSONResponse({"detail": f"over {self.limit} requests in flight; retry"}, 429, {"Retry-After": "1"})
            return await refusal(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def create_app(lifespan: Callable | None = None, max_in_flight: int = 32, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The HTTP app; `lifespan` loads the pipeline into `app.state.pipeline`."""
    app = FastAPI(
        title="recsys",
        summary="Top-k recommendations: two-tower retrieval over FAISS, DeepFM ranking, online learning from events.",
        version="1",
        lifespan=lifespan,
    )

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(InFlightLimit, limit=max_in_flight)
    app.add_middleware(RequestMetrics)  # added last: outermost, so it counts refusals too

    @app.post("/v1/recommend", response_model=RecommendResponse, tags=["recommend"])
    def recommend(body: RecommendRequest, pipeline: PipelineDep, deadline: DeadlineDep) -> Response:
        """Top-k items for a user, ranked; items the user already interacted with are left out."""
        return json_response(pipeline.recommend(body, deadline))

    @app.post("/v1/candidates", response_model=CandidatesResponse, tags=["recommend"])
    def candidates(body: RecommendRequest, pipeline: PipelineDep, deadline: DeadlineDep) -> Response:
        """The candidate set before ranking, with retrieval scores and sources."""
        return json_response(pipeline.candidates(body, deadline))

    @app.exception_handler(EventLogUnavailable)
    async def event_log_unavailable(request: Request, exc: EventLogUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}; no event of the request was appended, retry"}, 503, {"Retry-After": "1"})

    @app.post("/v1/events", status_code=202, response_model=EventsResponse, tags=["events"])
    def events(body: EventsRequest, log: EventLogDep) -> EventsResponse:
        """Append what users did (impressions, clicks, purchases) to the event log, all or
        none; answered once the log holds them. The online trainer learns from them."""
        return accept_events(log, body)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request, response: Response) -> dict:
        """Models and index are loaded."""
        pipeline = getattr(request.app.state, "pipeline", None)
        if pipeline is None:
            response.status_code = 503
            return {"status": "loading"}
        return {"status": "ready", "model_version": pipeline.model_version}

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
