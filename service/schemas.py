"""The request and response contract, shared by HTTP and gRPC.

Both transports validate through these models, so a request is refused (or answered) the
same way whichever way it arrives.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_K = 500
MAX_CANDIDATES = 2000
MAX_EXCLUDE_IDS = 1000
UINT64_MAX = 2**64 - 1

Uint64 = Annotated[int, Field(ge=0, le=UINT64_MAX, strict=True)]
Strategy = Literal["two_tower", "knn_embed"]


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hour: Annotated[int | None, Field(ge=0, le=23, strict=True, description="Hour of day, 0-23 (UTC).")] = None
    weekday: Annotated[int | None, Field(ge=0, le=6, strict=True, description="0 = Monday.")] = None


class RecommendRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": 42, "k": 10}]},
    )

    user_id: Uint64
    k: Annotated[int, Field(ge=1, le=MAX_K, strict=True, description="Items to return.")] = 10
    context: Context | None = None
    exclude_item_ids: Annotated[list[Uint64], Field(max_length=MAX_EXCLUDE_IDS)] = []
    strategy: Strategy = "two_tower"
    candidates: Annotated[
        int | None,
        Field(ge=1, le=MAX_CANDIDATES, strict=True, description="Candidates retrieved before ranking; at least k. Default: the service's setting."),
    ] = None

    @model_validator(mode="after")
    def _candidates_cover_k(self) -> "RecommendRequest":
        if self.candidates is not None and self.candidates < self.k:
            raise ValueError(f"candidates ({self.candidates}) must be at least k ({self.k})")
        return self


class ScoredItem(BaseModel):
    item_id: Uint64
    score: float


class Candidate(ScoredItem):
    source: str = Field(description="What produced the candidate: two_tower or popular.")


class RecommendResponse(BaseModel):
    user_id: Uint64
    items: list[ScoredItem]
    degraded: bool = Field(description="True when a stage failed and its fallback answered.")
    model_version: str


class CandidatesResponse(BaseModel):
    user_id: Uint64
    candidates: list[Candidate]
    degraded: bool
    model_version: str
