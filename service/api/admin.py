"""recsys.v1.Admin: index reload and item-vector upsert on a serving process (the embedded
service or the retrieval tier), behind a bearer token. Without RECSYS_ADMIN_TOKEN the
service is not registered, so every call is UNIMPLEMENTED."""

import hmac
from collections.abc import Callable

import numpy as np

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
