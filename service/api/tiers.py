"""`recsys serve retrieval|ranking`: one tier as its own process.

A tier is a gRPC server (its service, grpc.health.v1, reflection) plus /metrics on the HTTP
port. Health says NOT_SERVING until the models and index are loaded, so readiness means
"can answer", not "Redis is up". On SIGTERM or SIGINT health goes NOT_SERVING first, calls
are still answered for `SHUTDOWN_NOTICE_SECONDS` (readiness probes see it and take the replica
out of its Service), then the server stops taking calls (GOAWAY: gateways send new ones to other
replicas), calls in flight get `SHUTDOWN_GRACE_SECONDS` to finish, and the process exits.
"""

import logging
import signal
import threading
from typing import Literal

import torch
from prometheus_client import start_http_server

from service.api.admin import AdminServicer
from service.api.app import load_service
from service.api.grpc_server import GrpcServer, RankingServicer, RetrievalServicer
from service.bundle import RankingParts
from service.metrics import MODEL_INFO, READY
from service.pipeline import RankingStage
from service.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_NOTICE_SECONDS = 1.0  # NOT_SERVING while still answering
SHUTDOWN_GRACE_SECONDS = 5.0
TierName = Literal["retrieval", "ranking"]


def load_ranking(settings: Settings) -> RankingStage:
    parts = RankingParts.load(settings.artifacts, settings.ranker_variant)
    ranking = RankingStage(parts)
    MODEL_INFO.info({"version": parts.version, "ranker": ranking.ranker_info.model, "ranker_variant": ranking.ranker_info.variant})
    return ranking


def serve_tier(settings: Settings, tier: TierName) -> None:
    """Serve `tier` until SIGTERM / SIGINT."""
    torch.set_num_threads(settings.torch_threads)
    loaded: dict = {}
    if tier == "retrieval":
        services = [RetrievalServicer(lambda: loaded.get("pipeline"))]
        if settings.admin_token is not None:
            services.append(AdminServicer(lambda: loaded.get("admin"), settings.admin_token.get_secret_value()))
    else:
        services = [RankingServicer(lambda: loaded.get("ranking"))]
    server = GrpcServer(services, f"{settings.host}:{settings.grpc_port}", settings.grpc_workers, settings.max_in_flight)
    server.start()
    start_http_server(settings.http_port, addr=settings.host)
    log.info("%s tier: gRPC on %s:%d, /metrics on %s:%d", tier, settings.host, server.port, settings.host, settings.http_port)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    online = None
    try:
        if tier == "retrieval":
            # The trainer runs as its own process (`recsys online-train`) beside the tiers.
            loaded["pipeline"], online, loaded["admin"] = load_service(settings.model_copy(update={"online_trainer": "off"}))
        else:
            loaded["ranking"] = load_ranking(settings)
        READY.set(1)
        server.set_serving(True)
        log.info("%s tier serving", tier)
        stop.wait()
        log.info("%s tier draining", tier)
    finally:
        READY.set(0)
        server.stop(SHUTDOWN_GRACE_SECONDS, SHUTDOWN_NOTICE_SECONDS)
        if online is not None:
            online.stop()
        if "pipeline" in loaded:
            loaded["pipeline"].close()
