"""Runtime configuration: one settings class, read from `RECSYS_*` environment variables."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.schemas import MAX_CANDIDATES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    artifacts: Annotated[
        Path, Field(description="Artifact root (its newest version is served) or one version folder.")
    ] = Path("artifacts")
    host: str = "0.0.0.0"
    http_port: Annotated[int, Field(ge=1, le=65535)] = 8000
    grpc_port: Annotated[int, Field(ge=0, le=65535, description="0 turns gRPC off.")] = 50051
    grpc_workers: Annotated[int, Field(ge=1, le=256)] = 8
    torch_threads: Annotated[int, Field(ge=1, le=64, description="Intra-op threads per process.")] = 1
    default_candidates: Annotated[
        int, Field(ge=1, le=MAX_CANDIDATES, description="Candidates retrieved before ranking.")
    ] = 200
    history_length: Annotated[
        int, Field(ge=1, le=1000, description="Most recent items pooled into the user vector.")
    ] = 50
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
