"""The embedded service (`recsys serve`, the default): the artifact loaded once, one
in-process pipeline behind HTTP and gRPC, and the online-learning parts (event log, index
sync, and the trainer when it runs in process). The retrieval tier loads the same parts."""

import logging

import torch
from fastapi import FastAPI

from service.api.admin import AdminServicer, IndexAdmin, admin_router
from service.api.grpc_server import RecommenderServicer
from service.api.process import http_app
from service.api.served import Served
from service.artifact_tables import open_store
from service.bundle import ModelBundle
from service.online.parts import open_online
from service.online.runtime import make_index_sync, make_trainer
from service.pipeline.in_process import PipelineOptions, RecommendPipeline
from service.pipeline.served_log import open_served_log
from service.retrieval.index import SearchParams
from service.retrieval.index_versions import IndexReloader
from service.settings import Settings

log = logging.getLogger(__name__)


def load_embedded(settings: Settings) -> Served:
    """The artifact's models, index and tables, the in-process pipeline over them, online
    learning beside them, and what the Admin calls act on."""
    torch.set_num_threads(settings.torch_threads)
    params = SearchParams(nprobe=settings.index_nprobe, ef_search=settings.index_ef_search)
    bundle = ModelBundle.load(
        settings.artifacts,
        index_params=params,
        index_device=settings.index_device,
        ranker_variant=settings.ranker_variant,
    )
    log.info(
        "serving artifact %s (%d items, %d users), index %s (%s on %s), ranker %s",
        bundle.version,
        len(bundle.index),
        len(bundle.histories),
        bundle.index_version,
        bundle.index.description,
        bundle.index.device,
        bundle.ranker_variant,
    )
    store = open_store(settings, bundle)
    log.info("embedding table: %s", type(store).__name__)
    online = open_online(settings, store)
    pipeline = RecommendPipeline(
        bundle,
        store,
        PipelineOptions.from_settings(settings),
        online.recent,
        open_served_log(settings),
    )
    swap = None
    if settings.index_sync:
        sync = make_index_sync(bundle, store, bundle.index, online, pipeline.catalog)
        changes = sync.catch_up_catalog()  # before serving: hidden items stay hidden
        if changes:
            log.info("catalog: %d changes since the artifact applied", changes)
        online.start("index-sync", sync.run)
        online.start("catalog-sync", sync.run_catalog)
        swap = sync.swap_in
    reloader = IndexReloader(
        bundle.folder, bundle.index, bundle.index_version, params, settings.index_device, swap
    )
    if settings.index_poll_seconds:
        online.start("index-reload", lambda stop: reloader.run(stop, settings.index_poll_seconds))
    if settings.online_trainer == "in_process":
        online.start("online-trainer", make_trainer(settings, bundle, store, online).run)
    return Served(
        pipeline=pipeline,
        online=online,
        admin=IndexAdmin(reloader, store, online.updates, online.catalog, settings.artifacts),
    )


def build_app(settings: Settings) -> FastAPI:
    """HTTP on the app, gRPC Recommender (and Admin, with a token) beside it."""
    if settings.remote_tiers:
        raise ValueError(
            "settings name remote tiers: that is a gateway (`service.api.gateway.build_app`)"
        )
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None

    def services(served: Served) -> list:
        return [RecommenderServicer(served), *([AdminServicer(served, token)] if token else [])]

    return http_app(settings, load_embedded, services, [admin_router(token)] if token else [])
