"""HTTP/JSON transport (FastAPI). Handlers stay thin: validate, call the pipeline, answer.
What they serve is on `app.state` (`pipeline`, `online`), put there by the process's lifespan;
a part not loaded yet answers 503."""

import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from service.api.middleware import BodyLimit, InFlightLimit, RequestMetrics
from service.metrics import exposition
from service.online.streams import EventLog, EventLogUnavailable, accept_events
from service.pipeline.experiments import count_events
from service.pipeline.interface import Pipeline
from service.schemas import (
    CandidatesResponse,
    EventsRequest,
    EventsResponse,
    InvalidFilter,
    RecommendRequest,
    RecommendResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
    UnknownItem,
)


def get_pipeline(request: Request) -> Pipeline:
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
        Header(
            alias="X-Deadline-Ms",
            gt=0,
            le=60_000,
            description="How long the client waits, in milliseconds; the "
            "gateway answers within it (cut to RECSYS_MAX_DEADLINE_SECONDS). Unset: RECSYS_DEFAULT_DEADLINE_SECONDS.",
        ),
    ] = None,
) -> float | None:
    """The client's deadline as monotonic seconds (what gRPC clients send as grpc-timeout)."""
    return None if timeout_ms is None else time.monotonic() + timeout_ms / 1000


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
DeadlineDep = Annotated[float | None, Depends(get_deadline)]
EventLogDep = Annotated[EventLog, Depends(get_event_log)]

router = APIRouter()


def json_response(answer: BaseModel) -> Response:
    """The pipeline's answer, already a validated model, serialised once: returning the model
    would have FastAPI validate it again against `response_model` (which still documents it)."""
    return Response(answer.model_dump_json(), media_type="application/json")


FILTER_REFUSED = {
    422: {
        "description": "The request is invalid, or its filter names an attribute the catalog lacks."
    }
}


@router.post(
    "/v1/recommend", response_model=RecommendResponse, responses=FILTER_REFUSED, tags=["recommend"]
)
def recommend(body: RecommendRequest, pipeline: PipelineDep, deadline: DeadlineDep) -> Response:
    """Top-k items for a user, ranked; items the user already interacted with are left out."""
    return json_response(pipeline.recommend(body, deadline))


@router.post(
    "/v1/candidates",
    response_model=CandidatesResponse,
    responses=FILTER_REFUSED,
    tags=["recommend"],
)
def candidates(body: RecommendRequest, pipeline: PipelineDep, deadline: DeadlineDep) -> Response:
    """The candidate set before ranking, with retrieval scores and sources."""
    return json_response(pipeline.candidates(body, deadline))


@router.post(
    "/v1/similar-items",
    response_model=SimilarItemsResponse,
    responses={404: {"description": "The service holds no vector for the item."}, **FILTER_REFUSED},
    tags=["recommend"],
)
def similar_items(
    body: SimilarItemsRequest, pipeline: PipelineDep, deadline: DeadlineDep
) -> Response:
    """The items nearest to an item by its vector (a product page's "more like this"), the
    item itself left out."""
    try:
        return json_response(pipeline.similar_items(body, deadline))
    except UnknownItem as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


@router.post("/v1/events", status_code=202, response_model=EventsResponse, tags=["events"])
def events(body: EventsRequest, log: EventLogDep, request: Request) -> EventsResponse:
    """Append what users did (impressions, clicks, purchases) to the event log, all or
    none; answered once the log holds them. The online trainer learns from them."""
    accepted = accept_events(log, body)
    count_events(getattr(request.app.state, "pipeline", None), body)
    return accepted


@router.get("/healthz", tags=["health"])
def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
def readyz(request: Request, response: Response) -> dict:
    """Models and index are loaded."""
    pipeline = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        response.status_code = 503
        return {"status": "loading"}
    return {"status": "ready", "model_version": pipeline.model_version}


@router.get("/metrics", tags=["health"], include_in_schema=False)
def metrics() -> Response:
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


async def invalid_filter(request: Request, exc: InvalidFilter) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 422)


async def event_log_unavailable(request: Request, exc: EventLogUnavailable) -> JSONResponse:
    return JSONResponse(
        {"detail": f"{exc}; no event of the request was appended, retry"}, 503, {"Retry-After": "1"}
    )


def create_app(
    lifespan: Callable | None = None, max_in_flight: int = 32, max_body_bytes: int = 1 << 20
) -> FastAPI:
    """The HTTP app; `lifespan` loads what it serves into `app.state`."""
    app = FastAPI(
        title="recsys",
        summary="Top-k recommendations: two-tower retrieval over FAISS, DeepFM ranking, online learning from events.",
        version="1",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(InFlightLimit, limit=max_in_flight)
    app.add_middleware(RequestMetrics)  # added last: outermost, so it counts refusals too
    app.add_exception_handler(EventLogUnavailable, event_log_unavailable)
    app.add_exception_handler(InvalidFilter, invalid_filter)
    app.include_router(router)
    return app
