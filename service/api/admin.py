"""Admin: index reload and item-vector upsert on a serving process (the embedded service or
the retrieval tier), behind a bearer token: gRPC recsys.v1.Admin and HTTP /admin/v1/*.
Without RECSYS_ADMIN_TOKEN neither is registered (gRPC UNIMPLEMENTED, HTTP 404)."""

import hmac
from collections.abc import Callable
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from service.api.grpc_server import serve_call
from service.embeddings.artifact_tables import ITEM_TABLE
from service.embeddings.store import EmbeddingStore
from service.online.streams import ItemUpdateFeed
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.index_versions import IndexReloader
from service.schemas import UpsertItemVectorsRequest


class IndexAdmin:
    """What the Admin calls do, over one serving process's index reloader, embedding table
    and item-update feed."""

    def __init__(self, reloader: IndexReloader, store: EmbeddingStore, updates: ItemUpdateFeed):
        self.reloader = reloader
        self.store = store
        self.updates = updates

    @property
    def item_dim(self) -> int:
        return self.store.table(ITEM_TABLE).dim

    def reload_index(self) -> tuple[bool, str]:
        """Swap to the newest index version now; (whether it swapped, the version served)."""
        swapped = self.reloader.check()
        return swapped, self.reloader.current

    def upsert_item_vectors(self, request: UpsertItemVectorsRequest) -> int:
        """Write the vectors, then announce the items: index sync (in every serving process)
        re-embeds them from the table into the index."""
        ids = np.array([item.item_id for item in request.items], dtype=np.uint64)
        vectors = np.array([item.vector for item in request.items], dtype=np.float32)
        self.store.put_many(ITEM_TABLE, ids, vectors)
        self.updates.publish(ids)
        return len(ids)


def bearer_matches(metadata, token: str) -> bool:
    """Constant-time comparison, so the time taken says nothing of how much of it matched."""
    given = dict(metadata).get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


class ReloadIndexAnswer(BaseModel):
    swapped: bool
    index_version: str


class UpsertItemVectorsAnswer(BaseModel):
    upserted: int


def admin_router(token: str) -> APIRouter:
    """/admin/v1/*: the same calls as gRPC Admin, each needing `Authorization: Bearer <token>`."""
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        given = f"{credentials.scheme} {credentials.credentials}" if credentials else ""
        if not bearer_matches({"authorization": given}, token):
            raise HTTPException(401, "this call needs `Authorization: Bearer <RECSYS_ADMIN_TOKEN>`", {"WWW-Authenticate": "Bearer"})

    def loaded_admin(request: Request) -> IndexAdmin:
        admin = getattr(request.app.state, "admin", None)
        if admin is None:
            raise HTTPException(503, "models are not loaded yet")
        return admin

    AdminDep = Annotated[IndexAdmin, Depends(loaded_admin)]
    router = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Depends(authorized)])

    @router.post("/index/reload", response_model=ReloadIndexAnswer)
    def reload_index(admin: AdminDep) -> ReloadIndexAnswer:
        """Swap to the artifact's newest index version now (this process; others at their next poll)."""
        swapped, version = admin.reload_index()
        return ReloadIndexAnswer(swapped=swapped, index_version=version)

    @router.post("/items/vectors", response_model=UpsertItemVectorsAnswer)
    def upsert_item_vectors(body: UpsertItemVectorsRequest, admin: AdminDep) -> UpsertItemVectorsAnswer:
        """Write item id vectors into the embedding table and announce them to every serving process's index."""
        try:
            checked = UpsertItemVectorsRequest.model_validate(body.model_dump(), context={"dim": admin.item_dim})
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
        return UpsertItemVectorsAnswer(upserted=admin.upsert_item_vectors(checked))

    return router


class AdminServicer(pb_grpc.AdminServicer):
    service = "Admin"

    def __init__(self, admin: Callable[[], IndexAdmin | None], token: str):
        self._admin = admin
        self._token = token

    def _call(self, endpoint: str, context, parse, answer):
        return serve_call(
            endpoint, context, self._admin, parse, answer,
            authorized=lambda: bearer_matches(context.invocation_metadata(), self._token),
        )

    def ReloadIndex(self, request, context):
        def answer(admin: IndexAdmin, _) -> pb.ReloadIndexResponse:
            swapped, version = admin.reload_index()
            return pb.ReloadIndexResponse(swapped=swapped, index_version=version)

        return self._call("ReloadIndex", context, lambda: None, answer)

    def UpsertItemVectors(self, request, context):
        def parse() -> UpsertItemVectorsRequest:
            items = [{"item_id": item.item_id, "vector": list(item.vector)} for item in request.items]
            return UpsertItemVectorsRequest.model_validate({"items": items}, context={"dim": self._admin().item_dim})

        def answer(admin: IndexAdmin, parsed: UpsertItemVectorsRequest) -> pb.UpsertItemVectorsResponse:
            return pb.UpsertItemVectorsResponse(upserted=admin.upsert_item_vectors(parsed))

        return self._call("UpsertItemVectors", context, parse, answer)
