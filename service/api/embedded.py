"""The embedded service (`recsys serve`, the default): the artifact loaded once, one
in-process pipeline behind HTTP and gRPC, and the online-learning parts (event log, index
sync, and the trainer when it runs in process). The retrieval tier loads the same parts."""

import copy
import functools
import logging
from pathlib import Path

import torch
from fastapi import FastAPI
from threadpoolctl import threadpool_limits

from service.api.admin import AdminServicer, IndexAdmin, admin_router
from service.api.grpc_server import RecommenderServicer
from service.api.inspector import inspector_router
from service.api.process import http_app
from service.api.served import Served
from service.artifact_tables import open_store
from service.bundle import ModelBundle, RankingParts
from service.metrics import ARTIFACT_MEMORY
from service.online.parts import open_online
from service.online.runtime import make_index_sync, make_trainer
from service.pipeline.experiments import Assignment, ExperimentPipeline
from service.pipeline.in_process import PipelineOptions, RankingStage, RecommendPipeline
from service.pipeline.served_log import ServedListLogger, open_served_log
from service.retrieval.index import SearchParams, set_search_threads
from service.retrieval.index_versions import IndexReloader
from service.settings import Settings

log = logging.getLogger(__name__)


def limit_compute_threads(threads: int) -> None:
    """Threads one request's arithmetic may use in a serving process: torch's intra-op
    pool, numpy's BLAS (OpenBLAS's idle threads spin between calls, on the cores concurrent
    requests need; docs/deployment.md has what that cost) and FAISS's OpenMP
    (`set_search_threads`). Concurrent requests, and workers, use the other cores."""
    torch.set_num_threads(threads)
    threadpool_limits(threads, user_api="blas")
    set_search_threads(threads)


def load_bundle(settings: Settings) -> ModelBundle:
    """The artifact version the settings name, as the embedded service serves it."""
    limit_compute_threads(settings.torch_threads)
    return ModelBundle.load(
        settings.artifacts,
        index_params=search_params(settings),
        index_device=settings.index_device,
        ranker_variant=settings.ranker_variant,
    )


def search_params(settings: Settings) -> SearchParams:
    return SearchParams(nprobe=settings.index_nprobe, ef_search=settings.index_ef_search)


def load_embedded(settings: Settings, bundle: ModelBundle | None = None) -> Served:
    """The artifact's models, index and tables (`bundle`: loaded already, by the process
    the workers were forked from), the in-process pipeline over them, online learning
    beside them, and what the Admin calls act on."""
    if bundle is None:
        bundle = load_bundle(settings)
    else:  # thread counts are per process: the forked worker sets its own
        limit_compute_threads(settings.torch_threads)
    params = search_params(settings)
    log.info(
        "serving artifact %s (%d items, %d users), index %s (%s on %s), ranker %s "
        "(RECSYS_RANKER_VARIANT=%s; %s)",
        bundle.version,
        len(bundle.index),
        len(bundle.histories),
        bundle.index_version,
        bundle.index.description,
        bundle.index.device,
        bundle.ranker_variant,
        settings.ranker_variant,
        bundle.ranking_parts.figures or "no validation figures",
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
        pipeline=with_experiment(settings, pipeline, params),
        online=online,
        admin=IndexAdmin(reloader, store, online.updates, online.catalog, settings.artifacts),
    )


def resident_bytes() -> int:
    """This process's resident memory (Linux: VmRSS), 0 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def with_ranker_variant(pipeline: RecommendPipeline, variant: str) -> RecommendPipeline:
    """The pipeline with another of its artifact's ranker variants: everything else (index,
    tables, catalog, online learning) shared."""
    other = copy.copy(pipeline)
    other.ranking = RankingStage(
        RankingParts.load(pipeline.bundle.folder, variant),
        pipeline.options.rank_batch_delay,
        pipeline.options.ranker_runtime,
    )
    other.ranker_info = other.ranking.ranker_info
    return other


def load_version(
    settings: Settings,
    version: str,
    variant: str | None,
    params: SearchParams,
    served_log: ServedListLogger | None,
) -> RecommendPipeline:
    """Another artifact version's pipeline, for an experiment's arm (its answers logged
    with the served version's); its memory reported."""
    before = resident_bytes()
    bundle = ModelBundle.load(
        Path(settings.artifacts) / version,
        root=settings.artifacts,
        index_params=params,
        index_device=settings.index_device,
        ranker_variant=variant,
    )
    options = PipelineOptions.from_settings(settings)
    loaded = RecommendPipeline(bundle, options=options, served_log=served_log)
    added = max(resident_bytes() - before, 0)
    ARTIFACT_MEMORY.labels(version).set(added)
    log.info("experiment: version %s loaded, %.0f MiB resident", version, added / 2**20)
    return loaded


def with_experiment(settings: Settings, pipeline: RecommendPipeline, params: SearchParams):
    """The pipeline, or the experiment's over it and over the artifact versions and ranker
    variants its arms name. Another version is loaded beside the served one, from its own
    files, with an in-process table and no online learning (a version under test answers
    as its artifact does); another variant of the served version shares all but the ranker."""
    if settings.experiment is None:
        return pipeline
    built: dict[tuple, RecommendPipeline] = {}
    owned, by_arm = [], {}
    for arm in settings.experiment.arms:
        version = arm.version if arm.version != pipeline.model_version else None
        variant = arm.ranker_variant if arm.ranker_variant != pipeline.ranker_info.variant else None
        if version is None and variant is None:
            continue
        key = (version, variant)
        if key not in built and version is None:
            built[key] = with_ranker_variant(pipeline, variant)
        elif key not in built:
            variant = variant or settings.ranker_variant
            built[key] = load_version(settings, version, variant, params, pipeline.served_log)
            owned.append(built[key])
        by_arm[arm.name] = built[key]
    arms = [(a.name, a.weight, a.version, a.ranker_variant) for a in settings.experiment.arms]
    log.info(
        "experiment %s: arms (name, weight, version, ranker) %s", settings.experiment.name, arms
    )
    return ExperimentPipeline(Assignment(settings.experiment), pipeline, by_arm, owned)


def build_app(settings: Settings, bundle: ModelBundle | None = None) -> FastAPI:
    """HTTP on the app, gRPC Recommender (and Admin, with a token) beside it; `bundle`: the
    artifact loaded already (a worker forked after loading it), else loaded at startup."""
    if settings.remote_tiers:
        raise ValueError(
            "settings name remote tiers: that is a gateway (`service.api.gateway.build_app`)"
        )
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None

    def services(served: Served) -> list:
        return [RecommenderServicer(served), *([AdminServicer(served, token)] if token else [])]

    routers = [admin_router(token)] if token else []
    if settings.inspector:
        routers.append(inspector_router(token))
    return http_app(settings, functools.partial(load_embedded, bundle=bundle), services, routers)
