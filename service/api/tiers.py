"""`recsys serve retrieval|ranking|online-train`: one tier as its own process.

A tier is a gRPC server (its service, grpc.health.v1, reflection) plus /metrics, run by
`service.api.process.run_until_stopped`: health says NOT_SERVING until the models and index
are loaded, so readiness means "can answer", not "Redis is up"; on SIGTERM or SIGINT it says
NOT_SERVING and keeps answering for `SHUTDOWN_NOTICE_SECONDS`, then drains for
`SHUTDOWN_GRACE_SECONDS`. Before it says SERVING, a tier answers one request of its own
(`warm_up_*`): the first search, forward pass and store read pay for lazy set-up (thread
pools, allocations, connections), and a replica rolled in under load would otherwise spend
that on its first callers' deadlines. The online trainer answers health and reflection only (SERVING
once it is in its event group) and learns from the stream until stopped.
"""

import logging
import threading
from typing import Literal

import numpy as np
import torch

from service.api.admin import AdminServicer
from service.api.embedded import limit_compute_threads, load_embedded
from service.api.grpc_server import RankingServicer, RetrievalServicer
from service.api.process import ServingProcess, run_until_stopped
from service.api.served import Served
from service.artifact_tables import open_store
from service.bundle import ModelBundle, RankingParts
from service.metrics import MODEL_INFO
from service.online.parts import open_online
from service.online.runtime import make_trainer
from service.pipeline.in_process import RankingStage, RecommendPipeline
from service.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_NOTICE_SECONDS = 1.0  # NOT_SERVING while still answering
SHUTDOWN_GRACE_SECONDS = 5.0
TRAINER_GRPC_WORKERS = 2  # health and reflection only
TierName = Literal["retrieval", "ranking", "online-train"]


WARM_UP_CANDIDATES = 200  # about what one request retrieves and ranks


def warm_up_retrieval(pipeline: RecommendPipeline) -> None:
    """One candidate generation for a user of the artifact (below the request metrics)."""
    users = pipeline.bundle.features.users.ids
    if len(users):
        pipeline.generator.generate(int(users[0]), WARM_UP_CANDIDATES, np.empty(0, np.uint64))


def warm_up_ranking(ranking: RankingStage) -> None:
    """One forward pass over as many candidates as a request ranks (below the metrics)."""
    items = ranking.ranker.encoder.features.items.ids[:WARM_UP_CANDIDATES]
    ranking.ranker.score(0, items, np.zeros(len(items), np.float32))


def load_retrieval(settings: Settings) -> Served:
    # The trainer runs as its own process (`recsys serve online-train`) beside the tiers.
    # The gateway runs experiments (it assigns arms and forwards their defaults).
    served = load_embedded(
        settings.model_copy(update={"online_trainer": "off", "experiment": None})
    )
    warm_up_retrieval(served.pipeline)
    return served


def load_ranking(settings: Settings) -> Served:
    limit_compute_threads(settings.torch_threads)
    parts = RankingParts.load(settings.artifacts, settings.ranker_variant)
    ranking = RankingStage(parts, settings.rank_batch_delay_ms / 1000, settings.ranker_runtime)
    warm_up_ranking(ranking)
    MODEL_INFO.info(
        {
            "version": parts.version,
            **ranking.info,
        }
    )
    return Served(ranking=ranking)


def load_trainer(settings: Settings) -> Served:
    """The artifact, its tables on Redis (bulk settings: patient sockets, no local cache in
    front of rows it rewrites), the event group, and the trainer over them."""
    torch.set_num_threads(settings.torch_threads)  # like every process that runs torch
    bundle = ModelBundle.load(settings.artifacts)
    store = open_store(settings, bundle, bulk=True)
    online = open_online(settings, store)
    log.info(
        "online trainer %s: artifact %s, stream %s, group %s",
        settings.trainer_consumer,
        bundle.version,
        settings.events_stream,
        online.trainer_events.group,
    )
    return Served(
        online=online, trainer=make_trainer(settings, bundle, store, online), closers=[store.close]
    )


def train_until_stopped(served: Served, stop: threading.Event) -> None:
    served.trainer.run(stop)


def serve_tier(settings: Settings, tier: TierName) -> None:
    """Serve `tier` until SIGTERM / SIGINT; ValueError when the settings cannot run it."""
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    if tier == "retrieval":
        process = ServingProcess(
            settings,
            lambda s: [RetrievalServicer(s), *([AdminServicer(s, token)] if token else [])],
        )
        run_until_stopped(
            process,
            lambda: load_retrieval(settings),
            settings.http_port,
            SHUTDOWN_GRACE_SECONDS,
            SHUTDOWN_NOTICE_SECONDS,
        )
    elif tier == "ranking":
        process = ServingProcess(settings, lambda s: [RankingServicer(s)])
        run_until_stopped(
            process,
            lambda: load_ranking(settings),
            settings.http_port,
            SHUTDOWN_GRACE_SECONDS,
            SHUTDOWN_NOTICE_SECONDS,
        )
    else:
        if settings.redis_url is None:
            raise ValueError(
                "the online trainer needs RECSYS_REDIS_URL; without Redis the service itself trains on its events "
                "(RECSYS_ONLINE_TRAINER=in_process)"
            )
        process = ServingProcess(settings, lambda s: [], workers=TRAINER_GRPC_WORKERS)
        run_until_stopped(
            process,
            lambda: load_trainer(settings),
            settings.trainer_metrics_port,
            0.0,
            0.0,
            train_until_stopped,
        )
