"""Runtime configuration: one settings class, read from `RECSYS_*` environment variables."""

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.artifacts import RankerChoice, RankerVariantChoice
from service.schemas import MAX_CANDIDATES, MAX_COMPONENTS, Experiment, Rules


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    artifacts: Annotated[
        Path,
        Field(description="Artifact root (its newest version is served) or one version folder."),
    ] = Path("artifacts")
    host: str = "0.0.0.0"
    http_port: Annotated[int, Field(ge=1, le=65535)] = 8000
    grpc_port: Annotated[int, Field(ge=0, le=65535, description="0 turns gRPC off.")] = 50051
    grpc_workers: Annotated[int, Field(ge=1, le=256)] = 8
    workers: Annotated[
        int,
        Field(
            ge=1,
            le=64,
            description="Serving processes of `recsys serve all|gateway` on the same ports "
            "(SO_REUSEPORT), forked after the artifact is loaded so they share its memory; more "
            "than one needs RECSYS_REDIS_URL (the table, event log and catalog feed they share).",
        ),
    ] = 1
    max_body_bytes: Annotated[
        int,
        Field(
            ge=1024,
            le=1 << 30,
            description="Largest HTTP request body; larger ones get 413 (gRPC: 1 MiB messages).",
        ),
    ] = 1 << 20
    max_in_flight: Annotated[
        int,
        Field(
            ge=1,
            le=10_000,
            description="Requests one process serves at once, per transport (HTTP /v1/*, gRPC); "
            "beyond it 429 / RESOURCE_EXHAUSTED at once instead of a queue.",
        ),
    ] = 32
    torch_threads: Annotated[
        int,
        Field(
            ge=1,
            le=64,
            description="Intra-op threads per process, torch's, numpy's BLAS and FAISS's "
            "(OpenMP): one request's forward pass or search is too small to gain from more.",
        ),
    ] = 1
    default_candidates: Annotated[
        int, Field(ge=1, le=MAX_CANDIDATES, description="Candidates retrieved before ranking.")
    ] = 200
    history_length: Annotated[
        int,
        Field(
            ge=1,
            le=1000,
            description="Most recent items the user tower reads (at most the trained length).",
        ),
    ] = 50
    strategy: Annotated[
        Literal["two_tower", "knn_embed"],
        Field(
            description="Candidate generation when a request names none: one user vector, or kNN-Embed."
        ),
    ] = "two_tower"
    knn_alpha: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            description="kNN-Embed: weight of the neighbours' mixture; unset: what `recsys "
            "train`'s validation chose (0.5 for an artifact trained without it).",
        ),
    ] = None
    ranker_variant: Annotated[
        RankerVariantChoice,
        Field(
            description="Which copy of the artifact's ranker serves: auto: the smallest low-rank "
            "compressed copy whose validation AUC is within 0.001 of the ranker as trained, else "
            "the ranker as trained; trained; output_features (output-feature compression); "
            "weight_svd (SVD of the weights).",
        ),
    ] = "auto"
    rank_batch_delay_ms: Annotated[
        float,
        Field(
            ge=0,
            le=100,
            description="Ranking batched across requests: concurrent requests' candidates share "
            "one forward pass; a forming batch waits at most this long for requests already in "
            "flight (a request alone never waits). 0 turns batching off.",
        ),
    ] = 1.0
    ranker_runtime: Annotated[
        Literal["numpy", "torch"],
        Field(
            description="The ranker's forward pass: numpy (its weights copied into numpy "
            "arrays: no per-operator dispatch; scores equal torch's within 1e-5) or torch.",
        ),
    ] = "numpy"
    ranker: Annotated[
        RankerChoice,
        Field(
            description="auto: rank where `recsys train`'s validation found ranked order above "
            "retrieval order (else answers keep retrieval order, `ranker` null); on; off."
        ),
    ] = "auto"
    item_to_item_share: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            description="Share of the candidates from the item-to-item source (items that co-occur "
            "with the user's latest); unset: what `recsys train`'s validation chose.",
        ),
    ] = None
    rules: Annotated[
        Rules | None,
        Field(
            description="Default business rules and diversity, as JSON, e.g. "
            '\'{"max_per": {"attribute": "category", "count": 2}, "diversity": 0.2}\'; a '
            "request's `rules` override them field by field.",
        ),
    ] = None
    experiment: Annotated[
        Experiment | None,
        Field(
            description="An A/B experiment, as JSON: users split by a salted hash of their id "
            "into arms naming request defaults and (embedded service) an artifact version.",
        ),
    ] = None
    inspector: Annotated[
        bool,
        Field(
            description="Serve the inspector page at /inspector (embedded service; its data "
            "calls need RECSYS_ADMIN_TOKEN).",
        ),
    ] = False
    served_log: Annotated[
        Literal["off", "redis", "parquet"],
        Field(
            description="Log every served list (sampled): to a Redis stream "
            "(`served_log_stream`, needs RECSYS_REDIS_URL) or Parquet files (`served_log_dir`)."
        ),
    ] = "off"
    served_log_sample: Annotated[
        float, Field(ge=0, le=1, description="Share of the requests whose list is logged.")
    ] = 1.0
    served_log_stream: Annotated[str, Field(min_length=1)] = "recsys:served"
    served_log_max_length: Annotated[int, Field(ge=1000)] = 1_000_000
    served_log_dir: Path | None = None
    filter_cache_mib: Annotated[
        int,
        Field(
            ge=0,
            le=1 << 20,
            description="Memory for compiled request filters and what the index derives from "
            "them (kept ids, their ID selector and vectors), least recently used out first.",
        ),
    ] = 256
    knn_components: Annotated[
        int, Field(ge=1, le=MAX_COMPONENTS, description="kNN-Embed: interests kept (m).")
    ] = 8
    knn_reserved_share: Annotated[
        float | None,
        Field(
            ge=0,
            le=1,
            description="kNN-Embed: share of the candidates kept for the single-vector search; "
            "unset: what `recsys train`'s validation chose (0.2 for an artifact trained without it).",
        ),
    ] = None
    index_nprobe: Annotated[
        int, Field(ge=1, le=65536, description="IVF indexes: lists scanned per query.")
    ] = 32
    index_ef_search: Annotated[
        int, Field(ge=1, le=65536, description="HNSW indexes: candidate list length per query.")
    ] = 384
    index_device: Annotated[
        Literal["cpu", "gpu", "auto"],
        Field(
            description="Where the item index is searched; gpu needs faiss-gpu (the gpu extra); "
            "auto: a GPU if faiss sees one."
        ),
    ] = "auto"
    index_poll_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="How often to look for a newer index version (`recsys index build`); 0: never.",
        ),
    ] = 10.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    retrieval_address: Annotated[
        str | None,
        Field(
            description="The retrieval tier: host:port or a gRPC target naming several replicas "
            "(dns:///headless-service:port, "
            "ipv4:a:port,b:port), balanced round robin over the SERVING ones; with ranking_address, "
            "`recsys serve gateway` calls the tiers over gRPC."
        ),
    ] = None
    ranking_address: Annotated[
        str | None, Field(description="The ranking tier, as retrieval_address.")
    ] = None
    default_deadline_seconds: Annotated[
        float,
        Field(gt=0, le=60, description="Gateway: a request's deadline when the client sets none."),
    ] = 0.5
    max_deadline_seconds: Annotated[
        float,
        Field(
            gt=0,
            le=60,
            description="Gateway: longest deadline a client may set; longer ones are cut to it.",
        ),
    ] = 2.0
    retrieval_deadline_share: Annotated[
        float,
        Field(
            gt=0,
            lt=1,
            description="Gateway: share of the remaining time retrieval may use; ranking gets the rest.",
        ),
    ] = 0.6

    admin_token: Annotated[
        SecretStr | None,
        Field(
            min_length=16,
            description="Bearer token of the Admin calls, gRPC and HTTP (index reload, item-vector "
            "upsert, table-snapshot import); unset: they are off.",
        ),
    ] = None

    redis_url: Annotated[
        str | None,
        Field(
            description="Embedding table on Redis (redis://, rediss:// for TLS, password in the URL); "
            "unset: in-process table.",
            repr=False,
        ),  # the URL may hold a password
    ] = None
    redis_cluster: Annotated[
        bool, Field(description="The URL names a node of a Redis Cluster.")
    ] = False
    redis_namespace: Annotated[
        str | None,
        Field(
            description="Prefix of the table names in Redis; default: the artifact's version token."
        ),
    ] = None
    redis_socket_timeout: Annotated[
        float, Field(gt=0, le=5, description="Seconds, request path.")
    ] = 0.1
    embedding_ttl_seconds: Annotated[
        float | None,
        Field(gt=0, description="Rows not written for this long expire; unset: never."),
    ] = None
    embedding_cache_entries: Annotated[
        int, Field(ge=0, description="Local cache in front of Redis; 0: off.")
    ] = 100_000
    embedding_cache_ttl_seconds: Annotated[float, Field(gt=0)] = 1.0

    events_stream: Annotated[
        str, Field(min_length=1, description="Redis Stream key of the event log.")
    ] = "recsys:events"
    catalog_stream: Annotated[
        str,
        Field(
            min_length=1,
            description="Redis Stream key of the catalog's changes (hidden, upserted, deleted "
            "items), shared by every artifact version: a hidden item stays hidden after a "
            "retrain.",
        ),
    ] = "recsys:catalog"
    events_max_length: Annotated[
        int,
        Field(
            ge=1000,
            description="Cap of the event stream; keep it above the trainer's worst backlog.",
        ),
    ] = 10_000_000
    online_trainer: Annotated[
        Literal["in_process", "off"],
        Field(
            description="in_process: this process also trains on events (the embedded default; with Redis, "
            "let one process do it, or run `recsys online-train`)."
        ),
    ] = "in_process"
    index_sync: Annotated[
        bool,
        Field(description="Re-embed items the online trainer rewrote into this process's index."),
    ] = True
    online_learning_rate: Annotated[
        float,
        Field(
            gt=0, le=10, description="The online trainer's Adagrad rate for the artifact's rows."
        ),
    ] = 0.01
    online_new_row_learning_rate: Annotated[
        float,
        Field(gt=0, le=10, description="Its rate for rows the artifact lacks (new users, items)."),
    ] = 0.02
    online_steps: Annotated[
        int, Field(ge=1, le=100, description="Optimizer steps per batch of events.")
    ] = 1
    online_rows: Annotated[
        Literal["all", "new"],
        Field(
            description="Rows the online trainer moves: all admitted ones, or only those the "
            "artifact lacks (new users and items)."
        ),
    ] = "all"
    online_anchor: Annotated[
        float,
        Field(
            ge=0,
            lt=1,
            description="Share of its distance to the artifact's value a row gives back after "
            "each online step.",
        ),
    ] = 0.1
    online_batch_events: Annotated[int, Field(ge=1, le=10_000)] = 512
    trainer_consumer: Annotated[
        str,
        Field(
            min_length=1, description="Consumer name in the event group; keep it across restarts."
        ),
    ] = socket.gethostname()
    trainer_metrics_port: Annotated[
        int, Field(ge=0, le=65535, description="`recsys online-train` /metrics; 0: off.")
    ] = 9102

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("RECSYS_REDIS_URL must start with redis://, rediss:// or unix://")
        return url

    @field_validator("retrieval_address", "ranking_address")
    @classmethod
    def _host_port(cls, address: str | None) -> str | None:
        if address is not None and not all(
            part.rpartition(":")[2].isdigit() for part in address.split(",")
        ):
            raise ValueError(f"{address!r} is not host:port or a gRPC target ending in :port")
        return address

    @model_validator(mode="after")
    def _gateway_needs_both_tiers_and_the_event_log(self) -> "Settings":
        if (self.retrieval_address is None) != (self.ranking_address is None):
            raise ValueError(
                "set both RECSYS_RETRIEVAL_ADDRESS and RECSYS_RANKING_ADDRESS (a gateway calls both tiers), or neither"
            )
        if self.retrieval_address is not None and self.redis_url is None:
            raise ValueError(
                "a gateway calling remote tiers needs RECSYS_REDIS_URL: its events go to the shared stream"
            )
        if self.default_deadline_seconds > self.max_deadline_seconds:
            raise ValueError(
                "RECSYS_DEFAULT_DEADLINE_SECONDS must not exceed RECSYS_MAX_DEADLINE_SECONDS"
            )
        if self.inspector and self.admin_token is None:
            raise ValueError(
                "RECSYS_INSPECTOR needs RECSYS_ADMIN_TOKEN: its calls show users' data"
            )
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(
                "RECSYS_WORKERS > 1 needs RECSYS_REDIS_URL: the workers share the embedding "
                "table, the event log and the catalog feed through it"
            )
        if self.served_log == "redis" and self.redis_url is None:
            raise ValueError("RECSYS_SERVED_LOG=redis needs RECSYS_REDIS_URL")
        if self.served_log == "parquet" and self.served_log_dir is None:
            raise ValueError("RECSYS_SERVED_LOG=parquet needs RECSYS_SERVED_LOG_DIR")
        return self

    @property
    def remote_tiers(self) -> bool:
        return self.retrieval_address is not None
