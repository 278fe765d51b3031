"""`recsys`: train, evaluate and serve."""

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from service.data.schema import DataError, Dataset

app = typer.Typer(
    help="Recommendation serving: train artifacts, evaluate them, serve them.", no_args_is_help=True
)
table_app = typer.Typer(
    help="The embedding table an artifact's models read (RECSYS_REDIS_* settings pick the store).",
    no_args_is_help=True,
)
app.add_typer(table_app, name="table")

DatasetOption = Annotated[
    str | None,
    typer.Option(help="synthetic[:users=N,items=N,categories=N,seed=N] or movielens-100k:PATH"),
]
InteractionsOption = Annotated[
    Path | None, typer.Option(help="CSV/Parquet with user_id,item_id,timestamp[,weight]")
]
ItemsOption = Annotated[
    Path | None, typer.Option(help="CSV/Parquet with item_id and attribute columns")
]


def _settings(**overrides):
    """RECSYS_* settings with the flags that were given; invalid ones as a usage error."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load(dataset: str | None, interactions: Path | None, items: Path | None) -> Dataset:
    from service.data.files import load_dataset, load_files

    try:
        if interactions is not None:
            if dataset is not None:
                raise DataError("give either --dataset or --interactions, not both")
            return load_files(interactions, items)
        return load_dataset(dataset or "synthetic")
    except DataError as exc:
        raise typer.BadParameter(str(exc)) from None


def _train_config(
    two_tower_epochs: int | None,
    ranker_epochs: int | None,
    seed: int,
    index_factory: str,
    knn_clusters: int | None = None,
    knn_neighbours: int | None = None,
    ranker_model: str = "deepfm",
    ranker_rank: int | None = None,
    explained_variance: float | None = None,
    user_id_dropout: float | None = None,
):
    from service.training.artifact import TrainConfig

    config = TrainConfig(index_factory=index_factory)
    epochs = {"epochs": two_tower_epochs, "sequence_epochs": two_tower_epochs}
    two_tower = replace(config.two_tower, seed=seed, **(epochs if two_tower_epochs else {}))
    if user_id_dropout is not None:
        two_tower = replace(two_tower, user_id_dropout=user_id_dropout)
    compression = replace(config.ranker.compression, explained_variance=explained_variance)
    ranker = replace(
        config.ranker,
        seed=seed,
        model=ranker_model,
        rank=ranker_rank,
        compression=compression,
        **({"epochs": ranker_epochs} if ranker_epochs else {}),
    )
    knn = {"clusters": knn_clusters, "neighbours": knn_neighbours}
    knn_embed = replace(
        config.knn_embed, seed=seed, **{k: v for k, v in knn.items() if v is not None}
    )
    return replace(config, two_tower=two_tower, ranker=ranker, knn_embed=knn_embed)


ValidateOption = Annotated[
    bool,
    typer.Option(
        help="First train on each user's history but the last interaction and retrieve for "
        "those held out: choose the user tower and the item-to-item share there, and train the "
        "ranker on those candidate lists (it serves only if it beats retrieval order there)."
    ),
]


class UserTower(str, Enum):
    auto = "auto"
    mean = "mean"
    sequence = "sequence"


UserTowerOption = Annotated[
    UserTower,
    typer.Option(
        help="The user tower: mean of the latest items, or causal self-attention over them "
        "(sequence); auto: each is validated and the better one kept (mean without validation)."
    ),
]


def _train_and_save(
    data: Dataset, out: Path, config, validate: bool, user_tower: UserTower = UserTower.auto
) -> Path:
    from service.evaluation import train_validated
    from service.training.artifact import train_and_save

    if user_tower != UserTower.auto:  # else the configuration's own (mean) unless validated
        config = replace(config, two_tower=replace(config.two_tower, user_tower=user_tower.value))
    if not validate:
        return train_and_save(data, str(out), config)
    towers = ("mean", "sequence") if user_tower == UserTower.auto else ()
    return train_validated(data, out, config, towers)


class RankerModel(str, Enum):
    deepfm = "deepfm"
    dcn_v2 = "dcn_v2"


KnnClustersOption = Annotated[
    int | None, typer.Option(min=1, max=65536, help="kNN-Embed: item clusters (interests).")
]
KnnNeighboursOption = Annotated[
    int | None,
    typer.Option(min=0, max=1000, help="kNN-Embed: nearest users that smooth a user's interests."),
]


UserIdDropoutOption = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=0.9,
        help="Share of training examples whose user-id vector is dropped, so the user tower "
        "also answers from the latest items alone (visitors' sessions, users the table does "
        "not hold yet); unset: 0.",
    ),
]


@app.command()
def train(
    dataset: DatasetOption = None,
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    out: Annotated[Path, typer.Option(help="Artifact root; each run adds a version.")] = Path(
        "artifacts"
    ),
    two_tower_epochs: Annotated[int | None, typer.Option(min=1)] = None,
    ranker_epochs: Annotated[int | None, typer.Option(min=1)] = None,
    index_factory: Annotated[str, typer.Option(help="FAISS factory string, or auto.")] = "auto",
    knn_clusters: KnnClustersOption = None,
    knn_neighbours: KnnNeighboursOption = None,
    ranker: Annotated[RankerModel, typer.Option(help="The ranking model.")] = RankerModel.deepfm,
    ranker_rank: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train the ranker's tables factorised: rank-r codes per row (no compressed copies then).",
        ),
    ] = None,
    compression_variance: Annotated[
        float | None,
        typer.Option(
            min=0.5,
            max=0.9999,
            help="Compressed ranker copies keep this share of each layer's variance; "
            "unset: a size budget (rank 4, 30% of dense weights).",
        ),
    ] = None,
    seed: int = 0,
    validate: ValidateOption = True,
    user_tower: UserTowerOption = UserTower.auto,
    user_id_dropout: UserIdDropoutOption = None,
    if_missing: Annotated[
        bool, typer.Option(help="Do nothing when --out already holds a version.")
    ] = False,
) -> None:
    """Train two-tower retrieval, the item index and the ranker (DeepFM or DCN-v2) into a new artifact version."""
    _setup_logging()
    from service.artifacts import ArtifactError, resolve_version

    if if_missing:
        try:
            typer.echo(f"artifact present, not training: {resolve_version(out)}")
            return
        except ArtifactError:
            pass

    data = _load(dataset, interactions, items)
    config = _train_config(
        two_tower_epochs,
        ranker_epochs,
        seed,
        index_factory,
        knn_clusters,
        knn_neighbours,
        ranker.value,
        ranker_rank,
        compression_variance,
        user_id_dropout,
    )
    folder = _train_and_save(data, out, config, validate, user_tower)
    typer.echo(f"artifact written: {folder}")


class Tier(str, Enum):
    all = "all"
    gateway = "gateway"
    retrieval = "retrieval"
    ranking = "ranking"
    online_train = "online-train"


@app.command()
def serve(
    tier: Annotated[
        Tier,
        typer.Argument(
            help="all: every tier in one process (embedded); gateway: HTTP and gRPC front calling the tiers at "
            "RECSYS_RETRIEVAL_ADDRESS and RECSYS_RANKING_ADDRESS; retrieval, ranking, online-train: one tier."
        ),
    ] = Tier.all,
    artifacts: Annotated[Path | None, typer.Option(help="Artifact root or version folder.")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port; 0 turns gRPC off.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="all, gateway: serving processes on the same ports, forked after loading "
            "(RECSYS_WORKERS; more than one needs RECSYS_REDIS_URL)."
        ),
    ] = None,
) -> None:
    """Serve every tier in one process (embedded, the default) or one tier of the distributed
    topology. Flags override RECSYS_* settings; a tier's --port serves its /metrics."""
    overrides = {
        "artifacts": artifacts,
        "host": host,
        "http_port": port,
        "grpc_port": grpc_port,
        "workers": workers,
    }
    settings = _settings(**overrides)
    _setup_logging(settings.log_level)
    if settings.workers > 1 and tier not in (Tier.all, Tier.gateway):
        raise typer.BadParameter(
            "--workers is for `serve all` and `serve gateway`; scale a tier with replicas",
            param_hint="--workers",
        )
    if tier in (Tier.retrieval, Tier.ranking, Tier.online_train):
        from service.api.tiers import serve_tier

        try:
            return serve_tier(settings, tier.value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="TIER") from None
    if (tier == Tier.gateway) != settings.remote_tiers:
        raise typer.BadParameter(
            "`serve gateway` needs RECSYS_RETRIEVAL_ADDRESS and RECSYS_RANKING_ADDRESS; `serve all` (embedded) "
            "needs neither",
            param_hint="TIER",
        )
    if settings.workers > 1:
        # Before the metrics are imported: every worker writes its values there (a folder
        # given in PROMETHEUS_MULTIPROC_DIR is emptied of an earlier run's files first).
        given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        metrics = Path(given or tempfile.mkdtemp(prefix="recsys-metrics-"))
        for stale in metrics.glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        from service.api.workers import serve_workers

        try:
            code = serve_workers(settings, gateway=tier == Tier.gateway)
        finally:
            if not given:
                shutil.rmtree(metrics, ignore_errors=True)
        raise typer.Exit(code)
    import uvicorn

    if tier == Tier.gateway:
        from service.api.gateway import build_app
    else:
        from service.api.embedded import build_app
    uvicorn.run(
        build_app(settings),
        host=settings.host,
        port=settings.http_port,
        log_level=settings.log_level.lower(),
    )


@app.command("online-train")
def online_train(
    artifacts: Annotated[Path | None, typer.Option(help="Artifact root or version folder.")] = None,
) -> None:
    """Learn from the event stream until SIGTERM: read it in a consumer group, update user
    and item vectors in the Redis table, announce new item vectors to the serving processes
    (the same as `recsys serve online-train`)."""
    serve(
        Tier.online_train, artifacts=artifacts, host=None, port=None, grpc_port=None, workers=None
    )


class Protocol(str, Enum):
    temporal = "temporal"
    leave_last_out = "leave-last-out"


@app.command("eval")
def evaluate(
    dataset: DatasetOption = None,
    interactions: InteractionsOption = None,
    items: ItemsOption = None,
    protocol: Annotated[
        Protocol,
        typer.Option(
            help="temporal: each user's latest --holdout held out, Recall@{10,50,100}; "
            "leave-last-out: each user's last interaction held out, HR and NDCG@{10,20}."
        ),
    ] = Protocol.temporal,
    holdout: Annotated[
        float,
        typer.Option(
            min=0.01, max=0.9, help="temporal: share of each user's latest interactions held out."
        ),
    ] = 0.2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
    artifacts_out: Annotated[
        Path | None, typer.Option(help="Keep the trained artifact here.")
    ] = None,
    two_tower_epochs: Annotated[int | None, typer.Option(min=1)] = None,
    ranker_epochs: Annotated[int | None, typer.Option(min=1)] = None,
    seed: int = 0,
    validate: ValidateOption = True,
    user_tower: UserTowerOption = UserTower.auto,
    user_id_dropout: UserIdDropoutOption = None,
) -> None:
    """Train on each user's past, then measure the pipeline, candidate generation alone and
    most-popular on what came after, through the serving code."""
    _setup_logging()
    from service.data.split import leave_last_out, temporal_split
    from service.evaluation import evaluate_artifact, format_table

    data = _load(dataset, interactions, items)
    if protocol == Protocol.leave_last_out:
        train_part, test_part = leave_last_out(data)
    else:
        train_part, test_part = temporal_split(data, holdout)
    config = _train_config(
        two_tower_epochs, ranker_epochs, seed, "auto", user_id_dropout=user_id_dropout
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = _train_and_save(
            train_part, artifacts_out or Path(scratch), config, validate, user_tower
        )
        results = evaluate_artifact(folder, test_part, protocol.value)
    results["dataset"] = data.name
    if protocol == Protocol.temporal:
        results["holdout_fraction"] = holdout
    typer.echo(format_table(results))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))
        typer.echo(f"results written: {json_out}")


ArtifactsOption = Annotated[
    Path | None, typer.Option(help="Artifact root or version; default RECSYS_ARTIFACTS.")
]
TableArgument = Annotated[str, typer.Option("--table", help="Table name: user or item.")]


@contextlib.contextmanager
def _table_store(artifacts: Path | None):
    """(bundle, store) for the table commands, the store as it stands (bulk settings); it is
    closed on the way out."""
    from service.artifact_tables import connect_store
    from service.bundle import ModelBundle

    settings = _settings(artifacts=artifacts)
    bundle = ModelBundle.load(settings.artifacts)
    store = connect_store(settings, bundle, bulk=True)
    try:
        yield bundle, store
    finally:
        store.close()


@table_app.command("load")
def table_load(artifacts: ArtifactsOption = None) -> None:
    """Write an artifact's user and item vectors into the configured store."""
    _setup_logging()
    from service.artifact_tables import load_artifact

    with _table_store(artifacts) as (bundle, store):
        rows = load_artifact(store, bundle)
    typer.echo(f"loaded {rows} rows of artifact {bundle.version} into {type(store).__name__}")


@table_app.command("export")
def table_export(
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    table: TableArgument = "user",
    artifacts: ArtifactsOption = None,
) -> None:
    """Write every row of a table to Parquet (id: uint64, vector: fixed-size float32 list)."""
    from service.embeddings.snapshot import export_table

    with _table_store(artifacts) as (_, store):
        rows = export_table(store, table, out)
    typer.echo(f"exported {rows} rows of {table} to {out}")


@table_app.command("import")
def table_import(
    file: Annotated[Path, typer.Argument(help="Parquet file written by `recsys table export`.")],
    table: TableArgument = "user",
    artifacts: ArtifactsOption = None,
) -> None:
    """Write the rows of a Parquet snapshot into a table (fresh TTLs)."""
    from service.embeddings.snapshot import import_table

    with _table_store(artifacts) as (_, store):
        try:
            rows = import_table(store, table, file)
        except (ValueError, KeyError) as exc:
            raise typer.BadParameter(str(exc)) from None
    typer.echo(f"imported {rows} rows into {table}")


index_app = typer.Typer(help="The artifact's item index versions.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    factory: Annotated[
        str,
        typer.Option(
            help="FAISS factory string (Flat, IVF4096,Flat, IVF4096,SQ8, HNSW32) or auto."
        ),
    ] = "auto",
    artifacts: ArtifactsOption = None,
    seed: int = 0,
) -> None:
    """Build a new index version from the item table (with what the online trainer wrote,
    when the table is on Redis) into the artifact; serving processes swap to it."""
    _setup_logging()
    from service.artifact_tables import in_memory_store
    from service.retrieval.index_versions import build_index_version, table_item_vectors

    with _table_store(artifacts) as (bundle, store):
        if not store.size("item"):  # the in-process table of a command starts empty
            store = in_memory_store(bundle)
        ids, vectors = table_item_vectors(bundle, store)
    folder = build_index_version(bundle.folder, ids, vectors, factory, seed)
    typer.echo(f"index version written: {folder} ({len(ids)} items)")


knn_embed_app = typer.Typer(
    help="kNN-Embed's per-user interests in the embedding table.", no_args_is_help=True
)
app.add_typer(knn_embed_app, name="knn-embed")


@knn_embed_app.command("refresh")
def knn_embed_refresh(
    neighbours: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="Nearest users per user; default: the artifact's."),
    ] = None,
    artifacts: ArtifactsOption = None,
) -> None:
    """Recompute every user's smoothing neighbours from the live tables (user and item rows,
    recent items, interest counts) and write them to the interest_smoothing table."""
    _setup_logging()
    from service.embeddings.recent_items import RedisRecentItems
    from service.online.interests import refresh_smoothing

    settings = _settings(artifacts=artifacts)
    if settings.redis_url is None:
        raise typer.BadParameter(
            "the in-process tables live inside the serving process: set RECSYS_REDIS_URL to refresh shared tables",
            param_hint="RECSYS_REDIS_URL",
        )
    with _table_store(artifacts) as (bundle, store):
        recent = RedisRecentItems(
            store.client,
            store.config.namespace,
            settings.history_length,
            settings.embedding_ttl_seconds,
        )
        rows = refresh_smoothing(
            bundle.two_tower,
            bundle.histories,
            store,
            recent,
            neighbours or bundle.knn_embed_config.neighbours,
            min(settings.history_length, bundle.two_tower.config.history_length),
        )
    typer.echo(f"interest_smoothing rewritten for {rows} users")


ctr_app = typer.Typer(
    help="Standalone CTR models (DeepFM, DCN-v2) on click tables, compressed or not.",
    no_args_is_help=True,
)
app.add_typer(ctr_app, name="ctr")


class CompressionMethod(str, Enum):
    output_features = "output_features"
    weight_svd = "weight_svd"


@ctr_app.command("train")
def ctr_train(
    dataset: Annotated[
        str,
        typer.Option(
            help="criteo:PATH (a criteo-kaggle-8k folder), movielens-100k:PATH or synthetic[:opts]."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Model root; each run adds a version.")] = Path(
        "ctr-models"
    ),
    model: Annotated[RankerModel, typer.Option(help="The CTR model.")] = RankerModel.deepfm,
    dim: Annotated[int, typer.Option(min=2, max=256, help="Field vector size.")] = 16,
    rank: Annotated[
        int | None, typer.Option(min=1, help="Train factorised tables: rank-r codes per row.")
    ] = None,
    compress: Annotated[
        CompressionMethod | None, typer.Option(help="Compress the trained model after training.")
    ] = None,
    embedding_rank: Annotated[int, typer.Option(min=1, help="--compress: embedding rank.")] = 4,
    dense_keep: Annotated[
        float,
        typer.Option(
            min=0.01, max=1.0, help="--compress: share of each dense layer's weights kept."
        ),
    ] = 0.3,
    explained_variance: Annotated[
        float | None,
        typer.Option(
            min=0.5,
            max=0.9999,
            help="--compress: ranks keep this share of variance instead of the size budget.",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="At most; early stopping on dev AUC.")] = 20,
    seed: int = 0,
) -> None:
    """Train a CTR model on a click table with early stopping on dev AUC, optionally compress
    it, and write weights, field map and manifest (metrics, sizes) as a new version."""
    _setup_logging()
    from service.ctr.model import CtrModelConfig, fit_ctr_model
    from service.ctr.training import CtrTrainConfig
    from service.data.schema import DataError
    from service.ranking.compression import CompressionConfig

    if rank is not None and compress is not None:
        raise typer.BadParameter(
            "a factorised model (--rank) is low-rank already; --compress applies to full-table models",
            param_hint="--compress",
        )
    config = CtrModelConfig(
        model=model.value,
        dim=dim,
        rank=rank,
        compression=compress.value if compress else None,
        compression_config=CompressionConfig(embedding_rank, dense_keep, explained_variance),
        train=CtrTrainConfig(epochs=epochs, seed=seed),
    )
    try:
        saved = fit_ctr_model(dataset, out, config)
    except DataError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    metrics, size = saved.manifest["metrics"], saved.manifest["bytes"]
    typer.echo(
        f"CTR model written: {saved.folder}\n"
        f"test AUC {metrics['test']['auc']:.4f}, logloss {metrics['test']['logloss']:.4f}; "
        f"{size['total'] / 1024:.0f} KiB ({size['embeddings'] / 1024:.0f} KiB embeddings)"
        + (
            f"; as trained: test AUC {metrics['trained']['test']['auc']:.4f}, "
            f"{metrics['trained']['bytes']['total'] / 1024:.0f} KiB"
            if "trained" in metrics
            else ""
        )
    )
