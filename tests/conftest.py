import os
from dataclasses import replace
from pathlib import Path

import faiss
import pytest
from threadpoolctl import threadpool_limits

from service.artifacts import ranker_variant_serves
from service.bundle import ModelBundle
from service.data.synthetic import SyntheticConfig, generate
from service.pipeline.in_process import RecommendPipeline
from service.retrieval import index as index_module
from service.testing.redis_servers import RedisClusterServers, RedisServer
from service.training.artifact import TrainConfig, train_and_save

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MOVIELENS = SHARED_DATA / "movielens-100k"

TINY_DATA = SyntheticConfig(
    users=200, items=300, categories=8, interactions_per_user=(10, 30), seed=7
)


def tiny_train_config() -> TrainConfig:
    config = TrainConfig()
    return replace(
        config,
        two_tower=replace(config.two_tower, epochs=3, batch_size=256),
        ranker=replace(config.ranker, epochs=2, batch_size=512),
    )


@pytest.fixture(autouse=True)
def training_threads():
    """A serving app limits its process to one compute thread a request
    (`limit_compute_threads`); this process trains in later tests, as no serving process
    does: give training its cores back."""
    yield
    index_module._search_threads = None
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    threadpool_limits(os.cpu_count() or 1, user_api="blas")


@pytest.fixture(scope="session")
def tiny_dataset():
    return generate(TINY_DATA)


@pytest.fixture(scope="session")
def artifact_root(tmp_path_factory, tiny_dataset) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    train_and_save(tiny_dataset, str(root), tiny_train_config())
    return root


@pytest.fixture(scope="session")
def bundle(artifact_root) -> ModelBundle:
    return ModelBundle.load(artifact_root)


@pytest.fixture(scope="session")
def served_variant(bundle) -> str:
    """The ranker variant a service serves by default (RECSYS_RANKER_VARIANT=auto)."""
    return ranker_variant_serves(bundle.manifest) or bundle.ranker_variant


@pytest.fixture(scope="session")
def pipeline(bundle) -> RecommendPipeline:
    return RecommendPipeline(bundle)


@pytest.fixture(scope="session")
def known_user(bundle) -> int:
    """A user with a training history."""
    return int(bundle.features.users.ids[0])


@pytest.fixture(scope="session")
def redis_server():
    """A standalone redis-server on a free loopback port, for the whole session."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster():
    """A 3-master Redis Cluster on free loopback ports, for the whole session."""
    cluster = RedisClusterServers(3)
    yield cluster
    cluster.stop()
