"""The gateway (`recsys serve gateway`): HTTP and gRPC Recommender in front of the retrieval
and ranking tiers (`RemotePipeline`), the artifact's popular items as the fallback (kept to
the catalog the catalog feed says: filters, hidden items), events appended to the shared
stream. No model is loaded, and neither torch nor FAISS is imported
(tests/test_layers.py holds it to that); no index here, so no Admin calls."""

import logging
from functools import partial

from fastapi import FastAPI

from service.api.grpc_server import RecommenderServicer
from service.api.process import http_app
from service.api.remote import RemotePipeline
from service.api.served import Served
from service.artifacts import ranker_serves, read_manifest, resolve_version
from service.data.feature_space import FeatureSpace
from service.online.catalog_follow import CatalogFollower, apply_to_catalog
from service.online.parts import BLOCK_SECONDS, open_event_log
from service.pipeline.experiments import Assignment, ExperimentPipeline
from service.pipeline.served_log import open_served_log
from service.retrieval.catalog import ItemCatalog
from service.retrieval.popular import PopularItems
from service.settings import Settings

log = logging.getLogger(__name__)


def load_gateway(settings: Settings) -> Served:
    folder = resolve_version(settings.artifacts)
    manifest = read_manifest(folder, settings.artifacts)
    popular = PopularItems.from_folder(folder, manifest["version"])
    catalog = ItemCatalog.from_features(FeatureSpace.load(folder), settings.filter_cache_mib << 20)
    ranks = ranker_serves(manifest, settings.ranker)
    log.info(
        "gateway: retrieval at %s, ranking at %s%s; fallback items from %s",
        settings.retrieval_address,
        settings.ranking_address,
        "" if ranks else " (not called: answers keep retrieval order)",
        popular.version,
    )
    online = open_event_log(settings, settings.redis_namespace or popular.namespace)
    follower = CatalogFollower(online.catalog, partial(apply_to_catalog, catalog), BLOCK_SECONDS)
    follower.catch_up()  # before serving: the fallback never answers a hidden item
    online.start("catalog-follow", follower.run)
    pipeline = RemotePipeline(settings, popular, catalog, ranks, open_served_log(settings))
    if settings.experiment is not None:  # the arms' defaults go on to the tiers
        pipeline = ExperimentPipeline(Assignment(settings.experiment), pipeline, {})
    return Served(pipeline=pipeline, online=online)


def build_app(settings: Settings) -> FastAPI:
    arms = settings.experiment.arms if settings.experiment is not None else []
    if any(arm.version or arm.ranker_variant for arm in arms):
        raise ValueError(
            "a gateway's experiment arms cannot name artifact versions or ranker variants: its "
            "tiers serve one of each; run tiers per arm behind their own gateway, or serve "
            "the arms embedded"
        )
    if not settings.remote_tiers:
        raise ValueError("a gateway needs RECSYS_RETRIEVAL_ADDRESS and RECSYS_RANKING_ADDRESS")
    return http_app(settings, load_gateway, lambda served: [RecommenderServicer(served)])
