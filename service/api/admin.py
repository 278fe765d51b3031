"""Admin: index reload, item-vector upsert and table-snapshot import on a serving process
(the embedded service or the retrieval tier), behind a bearer token: gRPC recsys.v1.Admin
and HTTP /admin/v1/*. Without RECSYS_ADMIN_TOKEN neither is registered (gRPC UNIMPLEMENTED,
HTTP 404)."""

import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from service.api.grpc_server import InvalidArgument, serve_call
from service.embeddings.artifact_tables import ITEM_TABLE
from service.embeddings.snapshot import import_table
from service.embeddings.store import EmbeddingStore
from service.online.streams import ItemUpdateFeed
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.index_versions import IndexReloader
from service.schemas import ImportTableRequest, UpsertItemVectorsRequest


class IndexAdmin:
    """What the Admin calls do, over one serving process's index reloader, embedding table
    and item-update feed."""

    def __init__(self, reloader: IndexReloader, store: EmbeddingStore, updates: ItemUpdateFeed, root: Path):
        """`root`: the artifact root; snapshots are imported from files under it only."""
        self.reloader = reloader
        self.store = store
        self.updates = updates
        self.root = Path(root).resolve()

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


    def snapshot_file(self, path: str) -> Path:
        """`path` under the artifact root, or ValueError: nothing outside it is read."""
        resolved = (self.root / path).resolve()  # symlinks and `..` resolved before the check
        if not resolved.is_relative_to(self.root):
            raise ValueError(f"{path!r} is outside the artifact root")
        if not resolved.is_file():
            raise ValueError(f"{path!r} is no file under the artifact root")
        return resolved

    def import_table(self, request: ImportTableRequest) -> int:
        """Write a snapshot's rows into a table; imported item rows are announced, so every
        serving process's index sync re-embeds them."""
        if request.table not in self.store.tables:
            raise ValueError(f"no embedding table {request.table!r}; tables: {sorted(self.store.tables)}")
        announce = self.updates.publish if request.table == ITEM_TABLE else None
        return import_table(self.store, request.table, self.snapshot_file(request.path), announce)


def bearer_matches(metadata, token: str) -> bool:
    """Constant-time comparison, so the time taken says nothing of how much of it matched."""
    given = dict(metadata).get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


class ReloadIndexAnswer(BaseModel):
    swapped: bool
    index_version: str


class UpsertItemVectorsAnswer(BaseModel):
    upserted: int


class ImportTableAnswer(BaseModel):
    rows: int


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

    @router.post("/tables/import", response_model=ImportTableAnswer)
    def import_table_snapshot(body: ImportTableRequest, admin: AdminDep) -> ImportTableAnswer:
        """Write a Parquet table snapshot from under the artifact root into an embedding table."""
        try:
            return ImportTableAnswer(rows=admin.import_table(body))
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

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

    def ImportTable(self, request, context):
        def answer(admin: IndexAdmin, parsed: ImportTableRequest) -> pb.ImportTableResponse:
            try:
                return pb.ImportTableResponse(rows=admin.import_table(parsed))
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None

        return self._call("ImportTable", context, lambda: ImportTableRequest(table=request.table, path=request.path), answer)
