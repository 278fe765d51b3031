"""The inspector: a small web page on the embedded service (`RECSYS_INSPECTOR=true`, with
`RECSYS_ADMIN_TOKEN`; off by default) to look at what the service does for a user or an
item: a user's recent items, interests (kNN-Embed components) and recommendations with
their source, component, retrieval and ranker scores and the rules that applied; an item's
attributes, hidden state and similar items; the served versions and experiment.

The page (`inspector.html`, plain HTML and a little JavaScript) holds no data; its JSON
calls need the admin token (`Authorization: Bearer`), which the page asks for. Ids travel
as strings: JavaScript's numbers hold 53 bits, not 64.
"""

from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse

from service.api.admin import RequireBearer
from service.pipeline.experiments import ExperimentPipeline
from service.pipeline.in_process import RecommendPipeline
from service.schemas import UINT64_MAX, RecommendRequest, SimilarItemsRequest, UnknownItem

PAGE = Path(__file__).with_name("inspector.html")
Id = Annotated[int, PathParam(ge=0, le=UINT64_MAX)]


def inspected(request: Request) -> tuple[RecommendPipeline, ExperimentPipeline | None]:
    """The in-process pipeline to inspect (the default version's, under an experiment)."""
    pipeline = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise HTTPException(503, "models are not loaded yet")
    if isinstance(pipeline, ExperimentPipeline):
        return pipeline.default, pipeline
    return pipeline, None


Inspected = Annotated[tuple, Depends(inspected)]


def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


def info(served: Inspected) -> dict:
    pipeline, experiment = served
    return {
        "model_version": pipeline.model_version,
        "ranker": f"{pipeline.ranker_info.model} ({pipeline.ranker_info.variant})"
        if pipeline.ranks
        else "off",
        "index": pipeline.generator.index.description,
        "experiment": None
        if experiment is None
        else {
            "name": experiment.name,
            "arms": [arm.name for arm in experiment.assignment.experiment.arms],
        },
    }


def user(user_id: Id, served: Inspected) -> dict:
    pipeline, experiment = served
    answerer = experiment or pipeline
    asked = RecommendRequest(user_id=user_id, k=10)
    answer = answerer.recommend(asked)
    found = answerer.candidates(asked.model_copy(update={"k": 10}))
    by_id = {c.item_id: c for c in found.candidates}
    history, _ = pipeline.generator.history(user_id)
    clusters, weights, _ = pipeline.generator.mixture(user_id, pipeline.knobs)
    return {
        "user_id": str(user_id),
        "experiment": answer.experiment,
        "arm": answer.arm,
        "model_version": answer.model_version,
        "rules": answer.rules,
        "recommendations": [
            {
                "item_id": str(item.item_id),
                "score": item.score,
                "retrieval_score": by_id[item.item_id].score if item.item_id in by_id else None,
                "source": by_id[item.item_id].source if item.item_id in by_id else "pin",
                "component": by_id[item.item_id].component if item.item_id in by_id else None,
            }
            for item in answer.items
        ],
        "recent_items": [str(i) for i in history[::-1][:20].tolist()],
        "interests": [
            {"cluster": int(c), "weight": float(w)}
            for c, w in zip(clusters.tolist(), weights.tolist())
        ],
    }


def item(item_id: Id, served: Inspected) -> dict:
    pipeline, _ = served
    catalog = pipeline.catalog
    ids = np.array([item_id], np.uint64)
    try:
        similar = pipeline.similar_items(SimilarItemsRequest(item_id=item_id, k=10))
    except UnknownItem:
        similar = None
    if similar is None and not catalog.holds(ids)[0]:
        raise HTTPException(404, f"item {item_id} is not in the catalog and has no vector")
    return {
        "item_id": str(item_id),
        "attributes": {
            column: sorted(catalog.values_of(ids, column)[0]) for column in catalog.columns
        },
        "hidden": bool(np.isin(ids, catalog.hidden)[0]),
        "deleted": bool(np.isin(ids, catalog.deleted)[0]),
        "similar": [
            {"item_id": str(s.item_id), "score": s.score}
            for s in (similar.items if similar else [])
        ],
    }


def inspector_router(token: str) -> APIRouter:
    router = APIRouter(tags=["inspector"], include_in_schema=False)
    router.add_api_route("/inspector", page, methods=["GET"])
    guarded = APIRouter(dependencies=[Depends(RequireBearer(token))])
    guarded.add_api_route("/inspector/api/info", info, methods=["GET"])
    guarded.add_api_route("/inspector/api/user/{user_id}", user, methods=["GET"])
    guarded.add_api_route("/inspector/api/item/{item_id}", item, methods=["GET"])
    router.include_router(guarded)
    return router
