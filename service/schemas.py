"""The request and response contract, shared by HTTP and gRPC.

Both transports validate through these models, so a request is refused (or answered) the
same way whichever way it arrives.
"""

import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_K = 500
MAX_CANDIDATES = 2000
MAX_EXCLUDE_IDS = 1000
MAX_RECENT_ITEMS = 1000  # the longest history a user tower may read (`history_length`)
MAX_EVENTS = 1000
MAX_COMPONENTS = 64
MAX_UPSERT_ITEMS = 10_000
MAX_VECTOR_DIM = 4096
MAX_FILTER_TERMS = 16
MAX_FILTER_VALUES = 1000
MAX_EVENT_FUTURE_SECONDS = 300  # clock skew a client may have; later timestamps are refused
UINT64_MAX = 2**64 - 1

Uint64 = Annotated[int, Field(ge=0, le=UINT64_MAX, strict=True)]
Strategy = Literal["two_tower", "knn_embed"]


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hour: Annotated[
        int | None, Field(ge=0, le=23, strict=True, description="Hour of day, 0-23 (UTC).")
    ] = None
    weekday: Annotated[int | None, Field(ge=0, le=6, strict=True, description="0 = Monday.")] = None


AttributeName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^=]+$")]
AttributeValue = Annotated[str, StringConstraints(min_length=1, max_length=256)]
AttributeValues = Annotated[list[AttributeValue], Field(min_length=1, max_length=MAX_FILTER_VALUES)]


class AttributeCondition(BaseModel):
    """One attribute's condition: the item has one of `in`'s values (an attribute may hold
    several, e.g. genres) and none of `not_in`'s; either or both."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    in_: Annotated[
        AttributeValues | None, Field(alias="in", description="The item has one of these values.")
    ] = None
    not_in: Annotated[
        AttributeValues | None, Field(description="The item has none of these values.")
    ] = None

    @model_validator(mode="after")
    def _says_something(self) -> "AttributeCondition":
        if self.in_ is None and self.not_in is None:
            raise ValueError("a condition needs `in`, `not_in` or both")
        return self


ItemFilter = Annotated[
    dict[AttributeName, AttributeCondition],
    Field(
        min_length=1,
        max_length=MAX_FILTER_TERMS,
        description="Only items whose catalog attributes meet every condition (AND), e.g. "
        '{"category": {"in": ["shoes", "bags"]}, "brand": {"not_in": ["acme"]}}; applied '
        "inside the index search. An item without catalog attributes meets none.",
    ),
]


class InvalidFilter(ValueError):
    """A filter that names an attribute the catalog does not have: 422 / INVALID_ARGUMENT."""


MAX_RULES = 16
MAX_PINS = 50


class AttributeFactor(BaseModel):
    """Items holding one of `values` of `attribute` get their score multiplied by `factor`."""

    model_config = ConfigDict(extra="forbid")

    attribute: AttributeName
    values: AttributeValues
    factor: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]


class Pin(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Uint64
    position: Annotated[int, Field(ge=1, le=MAX_K, strict=True, description="1 = first.")]


class MaxPer(BaseModel):
    """At most `count` items per value of `attribute` in the answer."""

    model_config = ConfigDict(extra="forbid")

    attribute: AttributeName
    count: Annotated[int, Field(ge=1, le=MAX_K, strict=True)]


class Rules(BaseModel):
    """Business rules and diversity, applied after ranking (each field: unset takes the
    service's default, `RECSYS_RULES`)."""

    model_config = ConfigDict(extra="forbid")

    boost: Annotated[
        list[AttributeFactor] | None,
        Field(
            max_length=MAX_RULES,
            description="Scores times factor (>= 1) for items holding a value.",
        ),
    ] = None
    bury: Annotated[
        list[AttributeFactor] | None,
        Field(
            max_length=MAX_RULES,
            description="Scores times factor (<= 1) for items holding a value.",
        ),
    ] = None
    pin: Annotated[
        list[Pin] | None,
        Field(max_length=MAX_PINS, description="Items placed at positions, candidates or not."),
    ] = None
    max_per: MaxPer | None = None
    diversity: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            allow_inf_nan=False,
            description="MMR weight over item vectors: 0 keeps score order, 1 is most diverse.",
        ),
    ] = None

    @model_validator(mode="after")
    def _factors_point_their_way(self) -> "Rules":
        if any(b.factor < 1 for b in self.boost or []):
            raise ValueError("a boost factor is at least 1 (bury lowers scores)")
        if any(b.factor > 1 for b in self.bury or []):
            raise ValueError("a bury factor is at most 1 (boost raises scores)")
        positions = [p.position for p in self.pin or []]
        if len(set(positions)) != len(positions) or len({p.item_id for p in self.pin or []}) != len(
            positions
        ):
            raise ValueError("pins need distinct items and distinct positions")
        return self

    def over(self, defaults: "Rules | None") -> "Rules":
        """These rules, each unset field taken from `defaults`."""
        if defaults is None:
            return self
        return Rules.model_validate(
            {**defaults.model_dump(exclude_none=True), **self.model_dump(exclude_none=True)}
        )


class KnnEmbedOptions(BaseModel):
    """Per-request overrides of kNN-Embed's knobs, for experiments; unset: the service's settings."""

    model_config = ConfigDict(extra="forbid")

    alpha: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            allow_inf_nan=False,
            description="Weight of the neighbours' mixture in the user's.",
        ),
    ] = None
    components: Annotated[
        int | None, Field(ge=1, le=MAX_COMPONENTS, strict=True, description="Interests kept (m).")
    ] = None
    reserved_share: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            allow_inf_nan=False,
            description="Share of the candidates kept for the single-vector search.",
        ),
    ] = None


class ArmDefaults(BaseModel):
    """What an arm changes in its users' requests, where a request leaves the field unset
    (rules: field by field, a request's own rules over the arm's)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy | None = None
    candidates: Annotated[int | None, Field(ge=1, le=MAX_CANDIDATES, strict=True)] = None
    knn_embed: KnnEmbedOptions | None = None
    rules: Rules | None = None


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[\w.-]+$")]
    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    version: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=128,
            pattern=r"^[\w.-]+$",
            description="An artifact version under the artifact root; unset: the one served.",
        ),
    ] = None
    ranker_variant: Annotated[
        str | None,
        Field(
            pattern=r"^[\w.-]+$",
            description="The ranker variant this arm serves (full, output_features, "
            "weight_svd, ...); unset: RECSYS_RANKER_VARIANT's.",
        ),
    ] = None
    request: ArmDefaults = ArmDefaults()


class Experiment(BaseModel):
    """Users split by a salted hash of their id into arms, in proportion to their weights;
    a user stays in their arm for as long as the experiment's name, salt and arms stay."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[\w.-]+$")]
    salt: Annotated[str, StringConstraints(max_length=64)] = ""
    arms: Annotated[list[Arm], Field(min_length=1, max_length=16)]

    @model_validator(mode="after")
    def _distinct_arms(self) -> "Experiment":
        if len({arm.name for arm in self.arms}) != len(self.arms):
            raise ValueError("arm names must be distinct")
        return self


class RecommendRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": 42, "k": 10}]},
    )

    user_id: Uint64
    k: Annotated[int, Field(ge=1, le=MAX_K, strict=True, description="Items to return.")] = 10
    context: Context | None = None
    exclude_item_ids: Annotated[list[Uint64], Field(max_length=MAX_EXCLUDE_IDS)] = []
    strategy: Annotated[
        Strategy | None,
        Field(
            description="Candidate generation: two_tower (one user vector) or knn_embed (one search per interest); "
            "default: the service's setting."
        ),
    ] = None
    knn_embed: KnnEmbedOptions | None = None
    candidates: Annotated[
        int | None,
        Field(
            ge=1,
            le=MAX_CANDIDATES,
            strict=True,
            description="Candidates retrieved before ranking; at least k. Default: the service's setting.",
        ),
    ] = None
    recent_item_ids: Annotated[
        list[Uint64],
        Field(
            max_length=MAX_RECENT_ITEMS,
            description="The session's latest items, oldest first, after what the service knows "
            "of the user: a visitor it does not know (a logged-out session) is served from them "
            "instead of popular items. The user tower reads the latest history-length items; "
            "none of these is recommended.",
        ),
    ] = []
    filter: ItemFilter | None = None
    rules: Rules | None = None

    @model_validator(mode="after")
    def _candidates_cover_k(self) -> "RecommendRequest":
        if self.candidates is not None and self.candidates < self.k:
            raise ValueError(f"candidates ({self.candidates}) must be at least k ({self.k})")
        return self


class RankRequest(BaseModel):
    """What the gateway sends the ranking tier: a user's candidates and their retrieval scores."""

    model_config = ConfigDict(extra="forbid")

    user_id: Uint64
    context: Context | None = None
    item_ids: Annotated[list[Uint64], Field(min_length=1, max_length=MAX_CANDIDATES)]
    retrieval_scores: Annotated[
        list[Annotated[float, Field(allow_inf_nan=False)]], Field(max_length=MAX_CANDIDATES)
    ]

    @model_validator(mode="after")
    def _one_score_per_item(self) -> "RankRequest":
        if len(self.retrieval_scores) != len(self.item_ids):
            raise ValueError(
                f"{len(self.retrieval_scores)} retrieval scores for {len(self.item_ids)} items"
            )
        return self


class ItemVector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Uint64
    vector: Annotated[
        list[Annotated[float, Field(allow_inf_nan=False)]],
        Field(min_length=1, max_length=MAX_VECTOR_DIM),
    ]


class UpsertItemVectorsRequest(BaseModel):
    """Item id vectors to write into the embedding table (admin). Validated with
    `context={"dim": ...}`, the vectors must have the item table's dimension."""

    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[ItemVector], Field(min_length=1, max_length=MAX_UPSERT_ITEMS)]

    @model_validator(mode="after")
    def _distinct_ids_table_dimension(self, info: ValidationInfo) -> "UpsertItemVectorsRequest":
        if len({item.item_id for item in self.items}) != len(self.items):
            raise ValueError("item ids must be distinct")
        dims = {len(item.vector) for item in self.items}
        expected = (info.context or {}).get("dim")
        if len(dims) != 1 or (expected is not None and dims != {expected}):
            raise ValueError(
                f"vectors have {sorted(dims)} dimensions; the item table has {expected or 'one'}"
            )
        return self


class CatalogItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Uint64
    attributes: Annotated[
        dict[AttributeName, Annotated[list[AttributeValue], Field(max_length=MAX_FILTER_TERMS)]],
        Field(
            max_length=MAX_FILTER_TERMS,
            description='Its attributes, each a list of values: {"category": ["shoes"]}; they '
            "replace what the catalog held for the item.",
        ),
    ] = {}


class UpsertItemsRequest(BaseModel):
    """Catalog items to add or change (admin): embedded by the item tower from their
    attributes and indexed on every serving process, before any click."""

    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[CatalogItem], Field(min_length=1, max_length=MAX_UPSERT_ITEMS)]

    @model_validator(mode="after")
    def _distinct_ids(self) -> "UpsertItemsRequest":
        if len({item.item_id for item in self.items}) != len(self.items):
            raise ValueError("item ids must be distinct")
        return self


class ItemIdsRequest(BaseModel):
    """Items to hide, unhide or delete (admin)."""

    model_config = ConfigDict(extra="forbid")

    item_ids: Annotated[list[Uint64], Field(min_length=1, max_length=MAX_UPSERT_ITEMS)]


class CatalogChangeResponse(BaseModel):
    items: int = Field(
        description="Items the change names; every serving process applies it within seconds."
    )


class ImportTableRequest(BaseModel):
    """A Parquet table snapshot to write into an embedding table (admin)."""

    model_config = ConfigDict(extra="forbid")

    table: Annotated[
        str,
        Field(
            min_length=1,
            max_length=64,
            pattern=r"^[a-z_]+$",
            description="An embedding table: user, item, interest, ...",
        ),
    ]
    path: Annotated[
        str,
        Field(
            min_length=1,
            max_length=1024,
            description="The snapshot file, relative to the artifact root.",
        ),
    ]


class ScoredItem(BaseModel):
    item_id: Uint64
    score: float


class Candidate(ScoredItem):
    source: str = Field(
        description="What produced the candidate: two_tower, knn_embed, item_to_item or popular."
    )
    component: int | None = Field(
        None, description="knn_embed: the item cluster (interest) it was retrieved for."
    )


class RankerInfo(BaseModel):
    model: str = Field(description="The CTR model: deepfm or dcn_v2.")
    variant: str = Field(
        description="full or factorised (as trained), output_features or weight_svd (compressed copies)."
    )


class RecommendResponse(BaseModel):
    user_id: Uint64
    items: list[ScoredItem]
    degraded: bool = Field(description="True when a stage failed and its fallback answered.")
    model_version: str
    ranker: RankerInfo | None = Field(
        description="What ranked the items; null when they are in retrieval order (fallback)."
    )
    rules: list[str] = Field(
        [],
        description="The rules that changed the answer: boost, bury, max_per, diversity, pin.",
    )
    request_id: str = Field(
        "",
        description="This answer's id: send it back on the events it leads to (and find "
        "the list in the served-list log).",
    )
    experiment: str | None = Field(None, description="The experiment the user is in, if any.")
    arm: str | None = Field(None, description="The experiment's arm that answered.")


class CandidatesResponse(BaseModel):
    user_id: Uint64
    candidates: list[Candidate]
    degraded: bool
    model_version: str
    request_id: str = ""
    experiment: str | None = None
    arm: str | None = None


class SimilarItemsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"item_id": 7, "k": 10}]}
    )

    item_id: Uint64
    k: Annotated[int, Field(ge=1, le=MAX_K, strict=True, description="Items to return.")] = 10
    filter: ItemFilter | None = None


class SimilarItemsResponse(BaseModel):
    item_id: Uint64
    items: list[ScoredItem] = Field(
        description="The nearest items by the item tower's vectors (cosine), the item itself "
        "left out, most similar first."
    )
    degraded: bool = Field(
        description="True when the retrieval tier failed and popular items answered."
    )
    model_version: str
    request_id: str = ""


class UnknownItem(LookupError):
    """The service holds no vector for the item: 404 / NOT_FOUND."""


EventType = Literal["impression", "click", "purchase"]
POSITIVE_EVENT_TYPES = frozenset({"click", "purchase"})  # what the online trainer learns from


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Uint64
    item_id: Uint64 = Field(
        description="Any 64-bit id: an item the catalog does not know yet is welcome."
    )
    type: EventType
    request_id: Annotated[
        str | None,
        Field(
            pattern=r"^[0-9a-f]{32}$",
            description="The `request_id` of the answer the event reacts to, if any.",
        ),
    ] = None
    timestamp: Annotated[
        float | None,
        Field(description="When it happened: Unix seconds or ISO 8601; default: when it arrives."),
    ] = None

    @field_validator("timestamp", mode="before")
    @classmethod
    def _unix_seconds(cls, value):
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                return value  # a numeric string, or an error the float parsing reports
            return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
        return value

    @field_validator("timestamp")
    @classmethod
    def _not_in_the_future(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= time.time() + MAX_EVENT_FUTURE_SECONDS:
            raise ValueError("timestamp must be Unix seconds between 1970 and now")
        return value


class EventsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"events": [{"user_id": 42, "item_id": 7, "type": "click"}]}]
        },
    )

    events: Annotated[list[Event], Field(min_length=1, max_length=MAX_EVENTS)]


class EventsResponse(BaseModel):
    accepted: int = Field(
        description="Events appended to the event log; all of the request's, or an error."
    )
