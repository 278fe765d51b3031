"""The embedded service: artifacts loaded once, one pipeline behind HTTP and gRPC, and the
online-learning parts (event log, index sync, and the trainer when it runs in process)."""

import logging
from contextlib import asynccontextmanager

import anyio.to_thread
import torch
from fastapi import FastAPI

from service.api.admin import AdminServicer, IndexAdmin, admin_router
from service.api.grpc_server import GrpcServer, RecommenderServicer
from service.api.http import create_app
from service.api.remote import RemotePipeline
from service.bundle import ModelBundle, PopularItems
from service.embeddings.artifact_tables import open_store
from service.metrics import READY
from service.online.runtime import (
    OnlineLearning,
    make_index_sync,
    make_trainer,
    open_event_log,
    open_online,
)
from service.pipeline import PipelineOptions, RecommendPipeline
from service.retrieval.index import SearchParams
from service.retrieval.index_versions import IndexReloader
from service.retrieval.knn_embed import MixtureKnobs
from service.settings import Settings

log = logging.getLogger(__name__)


def load_service(settings: Settings) -> tuple[RecommendPipeline, OnlineLearning, IndexAdmin]:
    params = SearchParams(nprobe=settings.index_nprobe, ef_search=settings.index_ef_search)
    bundle = ModelBundle.load(
        settings.artifacts, index_params=params, index_device=settings.index_device, ranker_variant=settings.ranker_variant
    )
    log.info(
        "serving artifact %s (%d items, %d users), index %s (%s on %s), ranker %s",
        bundle.version, len(bundle.index), len(bundle.histories), bundle.index_version, bundle.index.description, bundle.index.device,
        bundle.ranker_variant,
    )
    options = PipelineOptions(
        default_candidates=settings.default_candidates,
        history_length=settings.history_length,
        strategy=settings.strategy,
        knn_embed=MixtureKnobs(settings.knn_alpha, settings.knn_components, settings.knn_reserved_share),
    )
    store = open_store(settings, bundle)
    log.info("embedding table: %s", type(store).__name__)
    online = open_online(settings, bundle, store)
    pipeline = RecommendPipeline(bundle, store, options, online.recent)
    swap = None
    if settings.index_sync:
        sync = make_index_sync(bundle, store, bundle.index, online)
        online.start("index-sync", sync.run)
        swap = sync.swap_in
    reloader = IndexReloader(bundle.folder, bundle.index, bundle.index_version, params, settings.index_device, swap)
    if settings.index_poll_seconds:
        online.start("index-reload", lambda stop: reloader.run(stop, settings.index_poll_seconds))
    if settings.online_trainer == "in_process":
        online.start("online-trainer", make_trainer(settings, bundle, store, online).run)
    return pipeline, online, IndexAdmin(reloader, store, online.updates, settings.artifacts)


def load_gateway(settings: Settings) -> tuple[RemotePipeline, OnlineLearning, None]:
    """Distributed mode: the tiers over gRPC, the artifact's popular items as the fallback,
    events appended to the shared stream; no index here, so no admin."""
    popular = PopularItems.load(settings.artifacts)
    log.info("gateway: retrieval at %s, ranking at %s; fallback items from %s", settings.retrieval_address, settings.ranking_address, popular.version)
    return RemotePipeline(settings, popular), open_event_log(settings, settings.redis_namespace or popular.namespace), None


def build_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(settings.torch_threads)
        # Handlers run in anyio's thread pool: let it hold every request the limit admits.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.max_in_flight)
        app.state.pipeline = app.state.online = app.state.admin = None
        grpc_server = None
        if settings.grpc_port:
            services = [RecommenderServicer(lambda: app.state.pipeline, lambda: app.state.online)]
            if settings.admin_token is not None and not settings.remote_tiers:
                services.append(AdminServicer(lambda: app.state.admin, settings.admin_token.get_secret_value()))
            grpc_server = GrpcServer(services, f"{settings.host}:{settings.grpc_port}", settings.grpc_workers, settings.max_in_flight)
            grpc_server.start()
            log.info("gRPC listening on %s:%d", settings.host, grpc_server.port)
        app.state.grpc_server = grpc_server
        try:
            app.state.pipeline, app.state.online, app.state.admin = (load_gateway if settings.remote_tiers else load_service)(settings)
            READY.set(1)
            if grpc_server is not None:
                grpc_server.set_serving(True)
            yield
        finally:
            READY.set(0)
            if grpc_server is not None:
                grpc_server.stop()
            if app.state.online is not None:
                app.state.online.stop()
            if app.state.pipeline is not None:
                app.state.pipeline.close()

    app = create_app(lifespan, settings.max_in_flight, settings.max_body_bytes)
    if settings.admin_token is not None and not settings.remote_tiers:
        app.include_router(admin_router(settings.admin_token.get_secret_value()))
    return app
