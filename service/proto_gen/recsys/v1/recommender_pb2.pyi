import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Context(_message.Message):
    __slots__ = ("hour", "weekday")
    HOUR_FIELD_NUMBER: _ClassVar[int]
    WEEKDAY_FIELD_NUMBER: _ClassVar[int]
    hour: int
    weekday: int
    def __init__(self, hour: _Optional[int] = ..., weekday: _Optional[int] = ...) -> None: ...

class KnnEmbedOptions(_message.Message):
    __slots__ = ("alpha", "components", "reserved_share")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_SHARE_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    components: int
    reserved_share: float
    def __init__(self, alpha: _Optional[float] = ..., components: _Optional[int] = ..., reserved_share: _Optional[float] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "context", "exclude_item_ids", "strategy", "candidates", "knn_embed", "recent_item_ids", "filter", "rules")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeCondition
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeCondition, _Mapping]] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    KNN_EMBED_FIELD_NUMBER: _ClassVar[int]
    RECENT_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    k: int
    context: Context
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[int]
    strategy: str
    candidates: int
    knn_embed: KnnEmbedOptions
    recent_item_ids: _containers.RepeatedScalarFieldContainer[int]
    filter: _containers.MessageMap[str, AttributeCondition]
    rules: Rules
    def __init__(self, user_id: _Optional[int] = ..., k: _Optional[int] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., exclude_item_ids: _Optional[_Iterable[int]] = ..., strategy: _Optional[str] = ..., candidates: _Optional[int] = ..., knn_embed: _Optional[_Union[KnnEmbedOptions, _Mapping]] = ..., recent_item_ids: _Optional[_Iterable[int]] = ..., filter: _Optional[_Mapping[str, AttributeCondition]] = ..., rules: _Optional[_Union[Rules, _Mapping]] = ...) -> None: ...

class AttributeFactor(_message.Message):
    __slots__ = ("attribute", "values", "factor")
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    values: _containers.RepeatedScalarFieldContainer[str]
    factor: float
    def __init__(self, attribute: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., factor: _Optional[float] = ...) -> None: ...

class Pin(_message.Message):
    __slots__ = ("item_id", "position")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    position: int
    def __init__(self, item_id: _Optional[int] = ..., position: _Optional[int] = ...) -> None: ...

class MaxPer(_message.Message):
    __slots__ = ("attribute", "count")
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    count: int
    def __init__(self, attribute: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class Rules(_message.Message):
    __slots__ = ("boost", "bury", "pin", "max_per", "diversity")
    BOOST_FIELD_NUMBER: _ClassVar[int]
    BURY_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    boost: _containers.RepeatedCompositeFieldContainer[AttributeFactor]
    bury: _containers.RepeatedCompositeFieldContainer[AttributeFactor]
    pin: _containers.RepeatedCompositeFieldContainer[Pin]
    max_per: MaxPer
    diversity: float
    def __init__(self, boost: _Optional[_Iterable[_Union[AttributeFactor, _Mapping]]] = ..., bury: _Optional[_Iterable[_Union[AttributeFactor, _Mapping]]] = ..., pin: _Optional[_Iterable[_Union[Pin, _Mapping]]] = ..., max_per: _Optional[_Union[MaxPer, _Mapping]] = ..., diversity: _Optional[float] = ...) -> None: ...

class AttributeCondition(_message.Message):
    __slots__ = ("not_in",)
    IN_FIELD_NUMBER: _ClassVar[int]
    NOT_IN_FIELD_NUMBER: _ClassVar[int]
    not_in: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, not_in: _Optional[_Iterable[str]] = ..., **kwargs) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    score: float
    def __init__(self, item_id: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class RankerInfo(_message.Message):
    __slots__ = ("model", "variant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("user_id", "items", "degraded", "model_version", "ranker", "rules", "request_id", "experiment", "arm")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANKER_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    degraded: bool
    model_version: str
    ranker: RankerInfo
    rules: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    experiment: str
    arm: str
    def __init__(self, user_id: _Optional[int] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., degraded: _Optional[bool] = ..., model_version: _Optional[str] = ..., ranker: _Optional[_Union[RankerInfo, _Mapping]] = ..., rules: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., experiment: _Optional[str] = ..., arm: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "score", "source", "component")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    score: float
    source: str
    component: int
    def __init__(self, item_id: _Optional[int] = ..., score: _Optional[float] = ..., source: _Optional[str] = ..., component: _Optional[int] = ...) -> None: ...

class CandidatesResponse(_message.Message):
    __slots__ = ("user_id", "candidates", "degraded", "model_version", "request_id", "experiment", "arm")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    degraded: bool
    model_version: str
    request_id: str
    experiment: str
    arm: str
    def __init__(self, user_id: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., degraded: _Optional[bool] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., experiment: _Optional[str] = ..., arm: _Optional[str] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "k", "filter")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeCondition
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeCondition, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    k: int
    filter: _containers.MessageMap[str, AttributeCondition]
    def __init__(self, item_id: _Optional[int] = ..., k: _Optional[int] = ..., filter: _Optional[_Mapping[str, AttributeCondition]] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("item_id", "items", "degraded", "model_version", "request_id")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    degraded: bool
    model_version: str
    request_id: str
    def __init__(self, item_id: _Optional[int] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., degraded: _Optional[bool] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("item_ids", "scores", "sources", "source_names", "components", "degraded", "model_version", "vectors", "vector_dim")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAMES_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_DIM_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    sources: _containers.RepeatedScalarFieldContainer[int]
    source_names: _containers.RepeatedScalarFieldContainer[str]
    components: _containers.RepeatedScalarFieldContainer[int]
    degraded: bool
    model_version: str
    vectors: bytes
    vector_dim: int
    def __init__(self, item_ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., sources: _Optional[_Iterable[int]] = ..., source_names: _Optional[_Iterable[str]] = ..., components: _Optional[_Iterable[int]] = ..., degraded: _Optional[bool] = ..., model_version: _Optional[str] = ..., vectors: _Optional[bytes] = ..., vector_dim: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("user_id", "item_id", "type", "timestamp", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    item_id: int
    type: str
    timestamp: _timestamp_pb2.Timestamp
    request_id: str
    def __init__(self, user_id: _Optional[int] = ..., item_id: _Optional[int] = ..., type: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SendEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class SendEventsResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("user_id", "context", "item_ids", "retrieval_scores")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORES_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    context: Context
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    retrieval_scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, user_id: _Optional[int] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., item_ids: _Optional[_Iterable[int]] = ..., retrieval_scores: _Optional[_Iterable[float]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("scores", "ranker", "model_version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RANKER_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    ranker: RankerInfo
    model_version: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., ranker: _Optional[_Union[RankerInfo, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ReloadIndexRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadIndexResponse(_message.Message):
    __slots__ = ("swapped", "index_version")
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    swapped: bool
    index_version: str
    def __init__(self, swapped: _Optional[bool] = ..., index_version: _Optional[str] = ...) -> None: ...

class ItemVector(_message.Message):
    __slots__ = ("item_id", "vector")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item_id: _Optional[int] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class UpsertItemVectorsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemVector]
    def __init__(self, items: _Optional[_Iterable[_Union[ItemVector, _Mapping]]] = ...) -> None: ...

class UpsertItemVectorsResponse(_message.Message):
    __slots__ = ("upserted",)
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    def __init__(self, upserted: _Optional[int] = ...) -> None: ...

class ImportTableRequest(_message.Message):
    __slots__ = ("table", "path")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    table: str
    path: str
    def __init__(self, table: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ImportTableResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class AttributeValues(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class CatalogItem(_message.Message):
    __slots__ = ("item_id", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttributeValues
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttributeValues, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    attributes: _containers.MessageMap[str, AttributeValues]
    def __init__(self, item_id: _Optional[int] = ..., attributes: _Optional[_Mapping[str, AttributeValues]] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CatalogItem]
    def __init__(self, items: _Optional[_Iterable[_Union[CatalogItem, _Mapping]]] = ...) -> None: ...

class ItemIdsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, item_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CatalogChangeResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: int
    def __init__(self, items: _Optional[int] = ...) -> None: ...
