"""Admin: index reload, item-vector upsert, table-snapshot import and the catalog (items
upserted with attributes, hidden, unhidden, deleted) on a serving process (the embedded
service or the retrieval tier), behind a bearer token: gRPC recsys.v1.Admin and HTTP
/admin/v1/*. Without RECSYS_ADMIN_TOKEN neither is registered (gRPC UNIMPLEMENTED, HTTP
404). Catalog changes go on the catalog feed, which every serving process and gateway
applies (`service.online.catalog_follow`), this one included."""

import hmac
from pathlib import Path
from typing import Annotated

import grpc
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from service.api import codec
from service.api.grpc_server import InvalidArgument, Unauthenticated, answering, loaded, validated
from service.api.served import Served
from service.embeddings.snapshot import import_table
from service.embeddings.store import EmbeddingStore
from service.embeddings.tables import ITEM_TABLE
from service.online.streams import CatalogChange, CatalogFeed, CatalogOp, ItemUpdateFeed
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.index_versions import IndexReloader
from service.schemas import (
    CatalogChangeResponse,
    ImportTableRequest,
    ItemIdsRequest,
    UpsertItemsRequest,
    UpsertItemVectorsRequest,
)


class IndexAdmin:
    """What the Admin calls do, over one serving process's index reloader, embedding table
    and item-update feed."""

    def __init__(
        self,
        reloader: IndexReloader,
        store: EmbeddingStore,
        updates: ItemUpdateFeed,
        catalog: CatalogFeed,
        root: Path,
    ):
        """`root`: the artifact root; snapshots are imported from files under it only."""
        self.reloader = reloader
        self.store = store
        self.updates = updates
        self.catalog = catalog
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

    def upsert_items(self, request: UpsertItemsRequest) -> int:
        ids = np.array([item.item_id for item in request.items], dtype=np.uint64)
        attributes = [item.attributes for item in request.items]
        self.catalog.publish(CatalogChange("upsert", ids, attributes))
        return len(ids)

    def change_items(self, op: CatalogOp, request: ItemIdsRequest) -> int:
        """Hide, unhide or delete items."""
        ids = np.unique(np.array(request.item_ids, dtype=np.uint64))
        self.catalog.publish(CatalogChange(op, ids))
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
            raise ValueError(
                f"no embedding table {request.table!r}; tables: {sorted(self.store.tables)}"
            )
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


class RequireBearer:
    """The HTTP routes' check: `Authorization: Bearer <token>`, else 401."""

    scheme = HTTPBearer(auto_error=False)

    def __init__(self, token: str):
        self.token = token

    def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(scheme)]
    ) -> None:
        given = f"{credentials.scheme} {credentials.credentials}" if credentials else ""
        if not bearer_matches({"authorization": given}, self.token):
            raise HTTPException(
                401,
                "this call needs `Authorization: Bearer <RECSYS_ADMIN_TOKEN>`",
                {"WWW-Authenticate": "Bearer"},
            )


def loaded_admin(request: Request) -> IndexAdmin:
    admin = getattr(request.app.state, "admin", None)
    if admin is None:
        raise HTTPException(503, "models are not loaded yet")
    return admin


AdminDep = Annotated[IndexAdmin, Depends(loaded_admin)]


def reload_index(admin: AdminDep) -> ReloadIndexAnswer:
    """Swap to the artifact's newest index version now (this process; others at their next poll)."""
    swapped, version = admin.reload_index()
    return ReloadIndexAnswer(swapped=swapped, index_version=version)


def upsert_item_vectors(body: UpsertItemVectorsRequest, admin: AdminDep) -> UpsertItemVectorsAnswer:
    """Write item id vectors into the embedding table and announce them to every serving process's index."""
    try:
        checked = UpsertItemVectorsRequest.model_validate(
            body.model_dump(), context={"dim": admin.item_dim}
        )
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
    return UpsertItemVectorsAnswer(upserted=admin.upsert_item_vectors(checked))


def import_table_snapshot(body: ImportTableRequest, admin: AdminDep) -> ImportTableAnswer:
    """Write a Parquet table snapshot from under the artifact root into an embedding table."""
    try:
        return ImportTableAnswer(rows=admin.import_table(body))
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def upsert_items(body: UpsertItemsRequest, admin: AdminDep) -> CatalogChangeResponse:
    """Add or change catalog items with their attributes: every serving process embeds them
    from their attributes and indexes them within seconds, before any click."""
    return CatalogChangeResponse(items=admin.upsert_items(body))


def hide_items(body: ItemIdsRequest, admin: AdminDep) -> CatalogChangeResponse:
    """Never answer these items (out of stock, banned), on every process within seconds."""
    return CatalogChangeResponse(items=admin.change_items("hide", body))


def unhide_items(body: ItemIdsRequest, admin: AdminDep) -> CatalogChangeResponse:
    """Answer hidden items again."""
    return CatalogChangeResponse(items=admin.change_items("unhide", body))


def delete_items(body: ItemIdsRequest, admin: AdminDep) -> CatalogChangeResponse:
    """Take items out of the catalog: never answered, attributes forgotten, until upserted."""
    return CatalogChangeResponse(items=admin.change_items("delete", body))


CATALOG_ROUTES = {
    "/items": upsert_items,
    "/items/hide": hide_items,
    "/items/unhide": unhide_items,
    "/items/delete": delete_items,
}


def admin_router(token: str) -> APIRouter:
    """/admin/v1/*: the same calls as gRPC Admin, each needing `Authorization: Bearer <token>`."""
    router = APIRouter(
        prefix="/admin/v1", tags=["admin"], dependencies=[Depends(RequireBearer(token))]
    )
    router.add_api_route(
        "/index/reload", reload_index, methods=["POST"], response_model=ReloadIndexAnswer
    )
    router.add_api_route(
        "/items/vectors",
        upsert_item_vectors,
        methods=["POST"],
        response_model=UpsertItemVectorsAnswer,
    )
    router.add_api_route(
        "/tables/import", import_table_snapshot, methods=["POST"], response_model=ImportTableAnswer
    )
    for path, endpoint in CATALOG_ROUTES.items():
        router.add_api_route(
            path, endpoint, methods=["POST"], status_code=202, response_model=CatalogChangeResponse
        )
    return router


class AdminServicer(pb_grpc.AdminServicer):
    """gRPC recsys.v1.Admin: each call needs `authorization: Bearer <token>` metadata."""

    service = "Admin"

    def __init__(self, served: Served, token: str):
        self.served = served
        self._token = token

    def _admin(self, context: grpc.ServicerContext) -> IndexAdmin:
        """The loaded admin, once the caller is authorized (UNAUTHENTICATED before UNAVAILABLE)."""
        if not bearer_matches(context.invocation_metadata(), self._token):
            raise Unauthenticated(
                "this call needs `authorization: Bearer <RECSYS_ADMIN_TOKEN>` metadata"
            )
        return loaded(self.served.admin)

    def ReloadIndex(
        self, request: pb.ReloadIndexRequest, context: grpc.ServicerContext
    ) -> pb.ReloadIndexResponse:
        with answering("ReloadIndex", context):
            swapped, version = self._admin(context).reload_index()
            return pb.ReloadIndexResponse(swapped=swapped, index_version=version)

    def UpsertItemVectors(
        self, request: pb.UpsertItemVectorsRequest, context: grpc.ServicerContext
    ) -> pb.UpsertItemVectorsResponse:
        with answering("UpsertItemVectors", context):
            admin = self._admin(context)
            parsed = validated(codec.upsert_request_from_proto, request, admin.item_dim)
            return pb.UpsertItemVectorsResponse(upserted=admin.upsert_item_vectors(parsed))

    def ImportTable(
        self, request: pb.ImportTableRequest, context: grpc.ServicerContext
    ) -> pb.ImportTableResponse:
        with answering("ImportTable", context):
            admin = self._admin(context)
            parsed = validated(ImportTableRequest, table=request.table, path=request.path)
            try:
                return pb.ImportTableResponse(rows=admin.import_table(parsed))
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None

    def UpsertItems(
        self, request: pb.UpsertItemsRequest, context: grpc.ServicerContext
    ) -> pb.CatalogChangeResponse:
        with answering("UpsertItems", context):
            admin = self._admin(context)
            parsed = validated(codec.upsert_items_from_proto, request)
            return pb.CatalogChangeResponse(items=admin.upsert_items(parsed))

    def _change(
        self, op: CatalogOp, request: pb.ItemIdsRequest, context
    ) -> pb.CatalogChangeResponse:
        admin = self._admin(context)
        parsed = validated(codec.item_ids_from_proto, request)
        return pb.CatalogChangeResponse(items=admin.change_items(op, parsed))

    def HideItems(
        self, request: pb.ItemIdsRequest, context: grpc.ServicerContext
    ) -> pb.CatalogChangeResponse:
        with answering("HideItems", context):
            return self._change("hide", request, context)

    def UnhideItems(
        self, request: pb.ItemIdsRequest, context: grpc.ServicerContext
    ) -> pb.CatalogChangeResponse:
        with answering("UnhideItems", context):
            return self._change("unhide", request, context)

    def DeleteItems(
        self, request: pb.ItemIdsRequest, context: grpc.ServicerContext
    ) -> pb.CatalogChangeResponse:
        with answering("DeleteItems", context):
            return self._change("delete", request, context)
