"""Item index lifecycle: factory strings and search knobs, versioned index files, and the
swap to a new version while requests keep coming."""

import os
import shutil
import threading

import faiss
import numpy as np
import pytest
import torch

from service.artifact_tables import in_memory_store
from service.bundle import ModelBundle
from service.metrics import INDEX_SWAPS
from service.online.index_sync import IndexSync
from service.online.memory_streams import InMemoryItemUpdateFeed
from service.pipeline.in_process import RecommendPipeline
from service.retrieval import index as index_module
from service.retrieval.index import ItemIndex, SearchParams, gpus_available, set_search_threads
from service.retrieval.index_versions import (
    INDEX_FILE,
    IndexReloader,
    build_index_version,
    index_versions,
    table_item_vectors,
)
from service.retrieval.two_tower import item_vectors
from service.schemas import RecommendRequest


def unit_vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,SQ8", "HNSW32"])
def test_every_factory_keeps_real_ids_and_takes_upserts(factory):
    ids = np.arange(2**63, 2**63 + 2000, dtype=np.uint64)
    vectors = unit_vectors(2000)
    index = ItemIndex.build(ids, vectors, factory, SearchParams(nprobe=16, ef_search=256))
    _, found = index.search(vectors[:50], 10)
    assert (found[:, 0] == ids[:50]).mean() >= 0.9  # an item is its own nearest neighbour
    new_id = np.uint64(2**64 - 1)  # -1 to faiss: only an index that maps ids apart holds it
    if "IVF" in factory:
        assert index.upsert(np.array([new_id]), -vectors[7:8]) == 0 and len(index) == 2000
        new_id = np.uint64(2**64 - 2)
    assert index.upsert(np.array([new_id, ids[0]]), np.stack([-vectors[7], -vectors[8]])) == 1
    _, found = index.search(-vectors[7:8], 1)
    assert found[0, 0] == new_id and len(index) == 2001
    _, found = index.search(vectors[1:1000], 1)  # a replaced item leaves the others' ids right
    assert (found[:, 0] == ids[1:1000]).mean() >= 0.9
    # An item's vector reads back, replaced ones as upserted (the item-to-item source
    # scores its candidates with them); an id the index lacks is an error, not a default.
    tolerance = 0.02 if "SQ8" in factory else 1e-6
    read = index.reconstruct(np.array([ids[1], new_id, ids[0]]))
    np.testing.assert_allclose(
        read, np.stack([vectors[1], -vectors[7], -vectors[8]]), atol=tolerance
    )
    with pytest.raises(RuntimeError):
        index.reconstruct(np.array([5], dtype=np.uint64))


def test_an_ivf_index_written_inside_an_id_map_reads_back_and_takes_upserts(tmp_path):
    """Index files from before IVF kept the item ids itself (`IndexIDMap2` around IVF)."""
    ids = np.arange(2**63, 2**63 + 2000, dtype=np.uint64)
    vectors = unit_vectors(2000)
    old = faiss.index_factory(16, "IDMap2,IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    old.train(vectors)
    old.add_with_ids(vectors, ids.view(np.int64))
    faiss.write_index(old, str(tmp_path / "old.faiss"))
    index = ItemIndex.load(tmp_path / "old.faiss", SearchParams(nprobe=16))
    _, found = index.search(vectors[:50], 1)
    assert (found[:, 0] == ids[:50]).all() and index.description == "IndexIVFFlat"
    np.testing.assert_allclose(index.reconstruct(ids[[3, 1999]]), vectors[[3, 1999]], atol=1e-6)
    assert index.upsert(ids[:1], vectors[5:6]) == 0
    np.testing.assert_allclose(index.reconstruct(ids[:1]), vectors[5:6], atol=1e-6)
    index.save(tmp_path / "new.faiss")
    again = ItemIndex.load(tmp_path / "new.faiss")
    np.testing.assert_allclose(again.reconstruct(ids[:1]), vectors[5:6], atol=1e-6)


def test_search_knobs_reach_the_faiss_index():
    ids, vectors = np.arange(1, 1001, dtype=np.uint64), unit_vectors(1000)
    ivf = ItemIndex.build(ids, vectors, "IVF8,Flat", SearchParams(nprobe=3))
    assert faiss.extract_index_ivf(ivf.index).nprobe == 3
    hnsw = ItemIndex.build(ids, vectors, "HNSW16", SearchParams(ef_search=77))
    assert faiss.downcast_index(hnsw.index.index).hnsw.efSearch == 77
    assert hnsw.description == "IndexIDMap2,IndexHNSWFlat"


@pytest.fixture
def own_artifact(artifact_root, tmp_path):
    """A private copy of the tiny artifact: these tests add index versions to it."""
    folder = ModelBundle.load(artifact_root).folder
    return shutil.copytree(folder, tmp_path / folder.name)


def test_an_index_version_is_served_from_the_next_load_and_a_tampered_one_is_refused(own_artifact):
    bundle = ModelBundle.load(own_artifact)
    assert bundle.index_version == "artifact"
    ids, vectors = table_item_vectors(bundle, in_memory_store(bundle))
    np.testing.assert_allclose(vectors, item_vectors(bundle.two_tower, bundle.features), atol=1e-5)
    version = build_index_version(own_artifact, ids, vectors, "HNSW32")
    reloaded = ModelBundle.load(own_artifact, index_params=SearchParams(ef_search=64))
    assert reloaded.index_version == version.name and "HNSW" in reloaded.index.description
    with open(version / INDEX_FILE, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(Exception, match="sha256"):
        ModelBundle.load(own_artifact)


def test_the_index_swaps_under_load_with_no_failed_request(own_artifact):
    bundle = ModelBundle.load(own_artifact)
    store = in_memory_store(bundle)
    pipeline = RecommendPipeline(bundle, store)
    feed = InMemoryItemUpdateFeed()
    sync = IndexSync(bundle.two_tower, pipeline.catalog, store, bundle.index, feed, block_seconds=0)
    # An item the online trainer added before the new version was built.
    new_item = np.uint64(2**64 - 3)
    store.put_many(
        "item", [new_item], store.get_many("item", bundle.features.items.ids[:1]).vectors
    )
    feed.publish(np.array([new_item], np.uint64))
    sync.step()
    assert len(bundle.index) == len(bundle.features.items) + 1

    users = bundle.histories.user_ids[:50].tolist()
    failures, answered, stop = [], [0], threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                got = pipeline.candidates(
                    RecommendRequest(user_id=users[i % len(users)], candidates=100, k=10)
                )
                assert len(got.candidates) == 100
                answered[0] += 1
            except Exception as exc:  # any failure is what this test is about
                failures.append(exc)
            i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        ids, vectors = table_item_vectors(
            bundle, in_memory_store(bundle)
        )  # the artifact's items only
        build_index_version(own_artifact, ids, vectors, "IVF8,Flat")
        reloader = IndexReloader(
            own_artifact, bundle.index, "artifact", SearchParams(nprobe=8), "cpu", sync.swap_in
        )
        before = answered[0]
        swapped = INDEX_SWAPS.labels("swapped")._value.get()
        assert reloader.check() and not reloader.check()
        assert INDEX_SWAPS.labels("swapped")._value.get() == swapped + 1
        while answered[0] < before + 200 and not failures:
            threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert "IVF" in bundle.index.description
    # The online item survived the swap: replayed from the update feed.
    assert len(bundle.index) == len(bundle.features.items) + 1
    row = torch.from_numpy(store.get_many("item", [new_item]).vectors)
    with torch.inference_mode():
        embedded = bundle.two_tower.item_tower_from_vectors(
            row, torch.zeros((1, 1), dtype=torch.int64)
        ).numpy()
    assert bundle.index.search(embedded, 1)[1][0, 0] == new_item


def test_a_broken_index_version_is_not_swapped_in(own_artifact):
    bundle = ModelBundle.load(own_artifact)
    ids, vectors = table_item_vectors(bundle, in_memory_store(bundle))
    version = build_index_version(own_artifact, ids, vectors, "Flat")
    (version / INDEX_FILE).write_bytes(b"not an index")
    reloader = IndexReloader(own_artifact, bundle.index, "artifact", SearchParams(), "cpu")
    failed = INDEX_SWAPS.labels("failed")._value.get()
    assert not reloader.check()
    assert INDEX_SWAPS.labels("failed")._value.get() == failed + 1
    assert reloader.current == "artifact" and bundle.index.description == "IndexIDMap2,IndexFlatIP"
    assert [v.name for v in index_versions(own_artifact)] == [version.name]


@pytest.mark.skipif(
    not gpus_available(), reason="no GPU visible to faiss (needs faiss-gpu and an NVIDIA GPU)"
)
def test_the_gpu_index_answers_like_the_cpu_one_and_takes_upserts():
    ids, vectors = np.arange(1, 20_001, dtype=np.uint64), unit_vectors(20_000, 64)
    cpu = ItemIndex.build(ids, vectors, "IVF64,Flat", SearchParams(nprobe=64))
    gpu = ItemIndex.build(ids, vectors, "IVF64,Flat", SearchParams(nprobe=64), device="gpu")
    assert gpu.device == "gpu"
    np.testing.assert_array_equal(gpu.search(vectors[:20], 10)[1], cpu.search(vectors[:20], 10)[1])
    assert gpu.search(vectors[:1], 5000)[1].shape[1] == 2048  # the GPU's k limit
    gpu.upsert(np.array([ids[0]]), -vectors[:1])
    assert gpu.search(-vectors[:1], 1)[1][0, 0] == ids[0]


def test_serving_search_threads_hold_in_every_request_thread():
    """OpenMP keeps its thread count per thread: a request thread the serving process did
    not configure must still search with the serving count, not every core."""
    ids = np.arange(1, 501, dtype=np.uint64)
    index = ItemIndex.build(ids, unit_vectors(500), "Flat")
    seen = {}

    def request_thread() -> None:
        seen["before"] = faiss.omp_get_max_threads()
        index.search(unit_vectors(1, seed=3), 5)
        seen["after"] = faiss.omp_get_max_threads()

    try:
        set_search_threads(1)
        thread = threading.Thread(target=request_thread)
        thread.start()
        thread.join()
    finally:
        index_module._search_threads = None  # the test process trains in other tests
        faiss.omp_set_num_threads(seen.get("before", 1))
    assert seen["after"] == 1
    if (os.cpu_count() or 1) > 1:  # a new thread starts at OpenMP's default, every core
        assert seen["before"] > 1
