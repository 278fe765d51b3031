"""The proto messages of `proto/recsys/v1/recommender.proto` and the contract's pydantic
models (`service.schemas`) or candidate columns, both ways, in one file: a field added to
the proto is changed here. Requests from the wire are validated by the same models as HTTP
(a `ValidationError` is the caller's INVALID_ARGUMENT)."""

import numpy as np
from google.protobuf.json_format import MessageToDict

from service.pipeline.interface import StageFailed
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.retrieval.candidates import Candidates, labels
from service.schemas import (
    AttributeCondition,
    AttributeFactor,
    CandidatesResponse,
    Context,
    EventsRequest,
    ItemIdsRequest,
    RankerInfo,
    RankRequest,
    RecommendRequest,
    RecommendResponse,
    Rules,
    ScoredItem,
    SimilarItemsRequest,
    SimilarItemsResponse,
    UpsertItemsRequest,
    UpsertItemVectorsRequest,
)


def filter_from_proto(conditions) -> dict | None:
    """A proto filter map as the contract's fields; an empty list is an absent one (proto3
    cannot tell them apart)."""
    if not conditions:
        return None
    return {
        column: {
            key: list(values)
            for key, values in (("in", getattr(c, "in")), ("not_in", c.not_in))
            if values
        }
        for column, c in conditions.items()
    }


def filter_to_proto(conditions: dict[str, AttributeCondition] | None) -> dict | None:
    if conditions is None:
        return None
    return {
        column: pb.AttributeCondition(**{"in": c.in_ or [], "not_in": c.not_in or []})
        for column, c in conditions.items()
    }


def rules_from_proto(message: pb.RecommendRequest) -> dict | None:
    if not message.HasField("rules"):
        return None
    rules = message.rules
    fields = MessageToDict(rules, preserving_proto_field_name=True)
    if rules.pin:  # proto3 JSON writes 64-bit integers as strings
        fields["pin"] = [{"item_id": p.item_id, "position": p.position} for p in rules.pin]
    if rules.HasField("diversity"):
        fields["diversity"] = rules.diversity
    return fields


def rules_to_proto(rules: Rules | None) -> pb.Rules | None:
    if rules is None:
        return None

    def factors(rules_of: list[AttributeFactor] | None) -> list[pb.AttributeFactor]:
        return [
            pb.AttributeFactor(attribute=r.attribute, values=r.values, factor=r.factor)
            for r in rules_of or []
        ]

    return pb.Rules(
        boost=factors(rules.boost),
        bury=factors(rules.bury),
        pin=[pb.Pin(item_id=p.item_id, position=p.position) for p in rules.pin or []],
        max_per=pb.MaxPer(attribute=rules.max_per.attribute, count=rules.max_per.count)
        if rules.max_per
        else None,
        diversity=rules.diversity,
    )


def request_from_proto(message: pb.RecommendRequest) -> RecommendRequest:
    fields = MessageToDict(message, preserving_proto_field_name=True)
    # proto3 JSON writes 64-bit integers as strings; the contract takes integers.
    fields["user_id"] = message.user_id
    fields["exclude_item_ids"] = list(message.exclude_item_ids)
    fields["recent_item_ids"] = list(message.recent_item_ids)
    fields["filter"] = filter_from_proto(message.filter)
    fields["rules"] = rules_from_proto(message)
    if not message.strategy:
        fields.pop("strategy", None)
    return RecommendRequest.model_validate(fields)


def request_to_proto(request: RecommendRequest) -> pb.RecommendRequest:
    knobs = request.knn_embed.model_dump(exclude_none=True) if request.knn_embed else None
    return pb.RecommendRequest(
        user_id=request.user_id,
        k=request.k,
        context=context_to_proto(request.context),
        exclude_item_ids=request.exclude_item_ids,
        strategy=request.strategy or "",
        candidates=request.candidates,
        knn_embed=pb.KnnEmbedOptions(**knobs) if knobs is not None else None,
        recent_item_ids=request.recent_item_ids,
        filter=filter_to_proto(request.filter),
        rules=rules_to_proto(request.rules),
    )


def similar_request_from_proto(message: pb.SimilarItemsRequest) -> SimilarItemsRequest:
    return SimilarItemsRequest.model_validate(
        {
            "item_id": message.item_id,
            **({"k": message.k} if message.k else {}),
            "filter": filter_from_proto(message.filter),
        }
    )


def similar_request_to_proto(request: SimilarItemsRequest) -> pb.SimilarItemsRequest:
    return pb.SimilarItemsRequest(
        item_id=request.item_id, k=request.k, filter=filter_to_proto(request.filter)
    )


def scored_items_to_proto(items: list[ScoredItem]) -> list[pb.ScoredItem]:
    return [pb.ScoredItem(item_id=i.item_id, score=i.score) for i in items]


def similar_response_to_proto(answer: SimilarItemsResponse) -> pb.SimilarItemsResponse:
    return pb.SimilarItemsResponse(
        item_id=answer.item_id,
        items=scored_items_to_proto(answer.items),
        degraded=answer.degraded,
        model_version=answer.model_version,
        request_id=answer.request_id,
    )


def similar_response_from_proto(message: pb.SimilarItemsResponse) -> SimilarItemsResponse:
    return SimilarItemsResponse(
        item_id=message.item_id,
        items=[ScoredItem(item_id=i.item_id, score=i.score) for i in message.items],
        degraded=message.degraded,
        model_version=message.model_version,
    )


def context_to_proto(context: Context | None) -> pb.Context | None:
    return None if context is None else pb.Context(**context.model_dump(exclude_none=True))


def events_from_proto(message: pb.SendEventsRequest) -> EventsRequest:
    return EventsRequest.model_validate(
        {
            "events": [
                {
                    "user_id": e.user_id,
                    "item_id": e.item_id,
                    "type": e.type,
                    **({"request_id": e.request_id} if e.request_id else {}),
                    **(
                        {"timestamp": e.timestamp.seconds + e.timestamp.nanos / 1e9}
                        if e.HasField("timestamp")
                        else {}
                    ),
                }
                for e in message.events
            ]
        }
    )


def upsert_items_from_proto(message: pb.UpsertItemsRequest) -> UpsertItemsRequest:
    return UpsertItemsRequest.model_validate(
        {
            "items": [
                {
                    "item_id": item.item_id,
                    "attributes": {c: list(v.values) for c, v in item.attributes.items()},
                }
                for item in message.items
            ]
        }
    )


def item_ids_from_proto(message: pb.ItemIdsRequest) -> ItemIdsRequest:
    return ItemIdsRequest.model_validate({"item_ids": list(message.item_ids)})


def ranker_to_proto(ranker: RankerInfo | None) -> pb.RankerInfo | None:
    return None if ranker is None else pb.RankerInfo(model=ranker.model, variant=ranker.variant)


def ranker_from_proto(message: pb.RankerInfo) -> RankerInfo:
    return RankerInfo(model=message.model, variant=message.variant)


def recommend_response_to_proto(result: RecommendResponse) -> pb.RecommendResponse:
    return pb.RecommendResponse(
        user_id=result.user_id,
        items=scored_items_to_proto(result.items),
        degraded=result.degraded,
        model_version=result.model_version,
        ranker=ranker_to_proto(result.ranker),
        rules=result.rules,
        request_id=result.request_id,
        experiment=result.experiment or "",
        arm=result.arm or "",
    )


def candidates_to_proto(result: CandidatesResponse) -> pb.CandidatesResponse:
    return pb.CandidatesResponse(
        user_id=result.user_id,
        candidates=[
            pb.Candidate(item_id=c.item_id, score=c.score, source=c.source, component=c.component)
            for c in result.candidates
        ],
        degraded=result.degraded,
        model_version=result.model_version,
        request_id=result.request_id,
        experiment=result.experiment or "",
        arm=result.arm or "",
    )


def candidates_to_columns(found: Candidates, model_version: str) -> pb.RetrieveResponse:
    """The retrieval tier's answer: the candidates as packed columns, the sources coded."""
    names, codes = np.unique(found.sources.astype(str), return_inverse=True)
    components = np.array([-1 if c is None else c for c in found.components], dtype=np.int32)
    return pb.RetrieveResponse(
        item_ids=found.item_ids.tolist(),
        scores=found.scores.tolist(),
        sources=codes.tolist(),
        source_names=names.tolist(),
        components=components.tolist(),
        degraded=found.degraded,
        model_version=model_version,
        vectors=found.vectors.astype("<f4").tobytes() if found.vectors is not None else b"",
        vector_dim=found.vectors.shape[1] if found.vectors is not None else 0,
    )


def candidates_from_columns(message: pb.RetrieveResponse) -> Candidates:
    """The inverse of `candidates_to_columns`; columns that do not fit are the retrieval
    stage's failure (`StageFailed`), answered by its fallback."""
    n = len(message.item_ids)
    if not (len(message.scores) == len(message.sources) == len(message.components) == n) or any(
        code >= len(message.source_names) for code in message.sources
    ):
        raise StageFailed("retrieval answered columns of different lengths or an unnamed source")
    vectors = None
    if message.vector_dim:
        if len(message.vectors) != 4 * n * message.vector_dim:
            raise StageFailed("retrieval answered vectors that do not fit its candidates")
        vectors = np.frombuffer(message.vectors, dtype="<f4").reshape(n, message.vector_dim)
    components = np.array(message.components, dtype=np.int64).astype(object)
    components[components == -1] = None
    return Candidates(
        np.array(message.item_ids, dtype=np.uint64),
        np.array(message.scores, dtype=np.float32),
        np.array(message.source_names, dtype=object)[np.array(message.sources, dtype=np.int64)]
        if n
        else labels(None, 0),
        message.degraded,
        components,
        vectors.astype(np.float32) if vectors is not None else None,
    )


def rank_request_to_proto(request: RecommendRequest, found: Candidates) -> pb.RankRequest:
    return pb.RankRequest(
        user_id=request.user_id,
        context=context_to_proto(request.context),
        item_ids=found.item_ids.tolist(),
        retrieval_scores=found.scores.tolist(),
    )


def rank_request_from_proto(message: pb.RankRequest) -> RankRequest:
    return RankRequest.model_validate(
        {
            "user_id": message.user_id,
            "context": MessageToDict(message.context, preserving_proto_field_name=True)
            if message.HasField("context")
            else None,
            "item_ids": list(message.item_ids),
            "retrieval_scores": list(message.retrieval_scores),
        }
    )


def upsert_request_from_proto(
    message: pb.UpsertItemVectorsRequest, dim: int
) -> UpsertItemVectorsRequest:
    """Admin UpsertItemVectors, its vectors checked against the item table's `dim`."""
    items = [{"item_id": item.item_id, "vector": list(item.vector)} for item in message.items]
    return UpsertItemVectorsRequest.model_validate({"items": items}, context={"dim": dim})
