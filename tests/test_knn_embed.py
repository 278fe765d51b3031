"""kNN-Embed: budget split, smoothing, per-interest search, the contract over HTTP and gRPC,
interests kept current by clicks, and cold catalog items."""

import copy

import grpc
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from service.api.embedded import build_app
from service.artifact_tables import in_memory_store
from service.data.schema import Dataset
from service.embeddings.recent_items import InMemoryRecentItems
from service.embeddings.tables import INTEREST_TABLE, ITEM_TABLE, SMOOTHING_TABLE, USER_TABLE
from service.online.interests import InterestUpdater, live_user_vectors, refresh_smoothing
from service.pipeline.in_process import PipelineOptions, RecommendPipeline
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.retrieval.candidates import SOURCE_KNN_EMBED, SOURCE_TWO_TOWER
from service.retrieval.knn_embed import (
    MixtureKnobs,
    interest_counts,
    smoothed_mixture,
    split_budget,
)
from service.retrieval.two_tower import user_vectors
from service.schemas import KnnEmbedOptions, RecommendRequest
from service.settings import Settings
from service.testing.redis_servers import free_port
from service.training.artifact import train
from tests.conftest import tiny_train_config

NONE = np.empty(0, np.uint64)


@pytest.mark.parametrize(
    "total, weights, expected",
    [
        (10, [0.5, 0.3, 0.2], [5, 3, 2]),
        (7, [1 / 3, 1 / 3, 1 / 3], [3, 2, 2]),  # the leftover goes to the earlier component
        (5, [0.55, 0.45], [3, 2]),
        (3, [0.7, 0.2, 0.1], [2, 1, 0]),
        (0, [0.6, 0.4], [0, 0]),
    ],
)
def test_budget_is_split_by_largest_remainder(total, weights, expected):
    shares = split_budget(total, np.array(weights))
    assert shares.tolist() == expected and shares.sum() == total


def test_interest_counts_weigh_recent_items_more():
    counts = interest_counts(
        np.array([1, 2]), np.array([0, 3, 4]), np.array([0, 1, 0, 2]), 3, half_life=1.0
    )
    np.testing.assert_allclose(counts, [[0.25 + 1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])


def test_smoothing_mixes_the_neighbours_mixture_and_keeps_the_top_m():
    counts = np.array([3.0, 1.0, 0.0, 0.0], np.float32)
    neighbours = np.array([0.0, 0.0, 0.2, 0.8], np.float32)
    clusters, weights = smoothed_mixture(counts, neighbours, MixtureKnobs(alpha=0.0, components=4))
    assert clusters.tolist() == [0, 1] and np.allclose(weights, [0.75, 0.25])
    clusters, weights = smoothed_mixture(counts, neighbours, MixtureKnobs(alpha=0.5, components=2))
    assert clusters.tolist() == [3, 0] and np.allclose(weights, [0.4 / 0.775, 0.375 / 0.775])
    assert len(smoothed_mixture(np.zeros(4, np.float32), neighbours, MixtureKnobs())[0]) == 0


def test_neighbour_mixtures_come_from_users_with_similar_vectors(bundle):
    mixtures = bundle.mixtures
    vectors = user_vectors(bundle.two_tower, bundle.features, bundle.histories)
    own = mixtures.counts / mixtures.counts.sum(1, keepdims=True)
    # A user's neighbours share their interests more than random users do.
    agreement = (own * mixtures.smoothing).sum(1).mean()
    shuffled = (
        (own * mixtures.smoothing[np.random.default_rng(0).permutation(len(own))]).sum(1).mean()
    )
    assert agreement > 1.5 * shuffled
    assert len(vectors) == len(bundle.histories)


def test_each_interest_gets_its_share_from_inside_its_cluster(pipeline, bundle, known_user):
    knobs = MixtureKnobs(alpha=0.5, components=3, reserved_share=0.25)
    n = 24
    found = pipeline.generator.generate(known_user, n, NONE, "knn_embed", knobs)
    assert len(found) == n == len(set(found.item_ids.tolist()))
    assert not set(found.item_ids.tolist()) & set(bundle.histories.get(known_user).tolist())
    assert list(found.scores) == sorted(found.scores, reverse=True)
    from_interests = [i for i, s in enumerate(found.sources) if s == SOURCE_KNN_EMBED]
    assert from_interests and all(
        found.sources[i] == SOURCE_TWO_TOWER for i in range(n) if i not in from_interests
    )
    # Every interest candidate lies in the cluster it is reported for.
    reported = np.array([found.components[i] for i in from_interests])
    np.testing.assert_array_equal(
        bundle.mixtures.cluster_of(found.item_ids[from_interests]), reported
    )
    # And no interest got more than its share of the 18 candidates outside the reserve.
    clusters, weights, _ = pipeline.generator.mixture(known_user, knobs)
    budgets = dict(zip(clusters.tolist(), split_budget(n - 6, weights).tolist()))
    for cluster, count in zip(*np.unique(reported, return_counts=True)):
        assert count <= budgets[int(cluster)]
    # Items the request excludes are replaced, inside their interests too.
    dropped = found.item_ids[from_interests][:3]
    again = pipeline.generator.generate(known_user, n, dropped, "knn_embed", knobs)
    assert len(again) == n and not set(again.item_ids.tolist()) & set(dropped.tolist())


def test_a_full_reserve_is_the_single_vector_and_no_interests_fall_back_to_it(bundle, known_user):
    store = in_memory_store(bundle)
    pipeline = RecommendPipeline(bundle, store)
    single = pipeline.generator.generate(known_user, 30, NONE, "two_tower")
    everything_reserved = pipeline.generator.generate(
        known_user, 30, NONE, "knn_embed", MixtureKnobs(reserved_share=1.0)
    )
    np.testing.assert_array_equal(everything_reserved.item_ids, single.item_ids)
    assert set(pipeline.generator.generate(known_user, 30, NONE, "knn_embed").sources) == {
        SOURCE_KNN_EMBED,
        SOURCE_TWO_TOWER,
    }
    store.delete(INTEREST_TABLE, [known_user])  # a user whose interests expired
    fallback = pipeline.generator.generate(known_user, 30, NONE, "knn_embed")
    np.testing.assert_array_equal(fallback.item_ids, single.item_ids)
    assert set(fallback.sources) == {SOURCE_TWO_TOWER}


def test_request_defaults_are_validations_knobs_unless_set_and_a_request_overrides_them(
    bundle, known_user
):
    validated = copy.copy(bundle)
    validated.manifest = {
        **bundle.manifest,
        "validation": {"choices": {"knn_embed": {"alpha": 0.0, "reserved_share": 1.0}}},
    }
    pipeline = RecommendPipeline(validated, options=PipelineOptions(strategy="knn_embed"))
    assert pipeline.knobs == MixtureKnobs(alpha=0.0, components=8, reserved_share=1.0)
    # Validation gave the whole budget to the single vector: kNN-Embed answers as it does.
    asked = RecommendRequest(user_id=known_user, k=10, candidates=30)
    single = pipeline.candidates(asked.model_copy(update={"strategy": "two_tower"}))
    assert [c.item_id for c in pipeline.candidates(asked).candidates] == [
        c.item_id for c in single.candidates
    ]
    overridden = asked.model_copy(update={"knn_embed": KnnEmbedOptions(reserved_share=0.0)})
    assert SOURCE_KNN_EMBED in {c.source for c in pipeline.candidates(overridden).candidates}
    # A setting wins over validation for its own knob only.
    options = PipelineOptions.from_settings(Settings(knn_reserved_share=0.5))
    assert RecommendPipeline(validated, options=options).knobs == MixtureKnobs(0.0, 8, 0.5)
    # An artifact trained without validation keeps the built-in defaults.
    assert "validation" not in bundle.manifest
    assert RecommendPipeline(bundle).knobs == MixtureKnobs()


def test_interests_are_in_the_table_and_drive_the_split(bundle, known_user):
    store = in_memory_store(bundle)
    pipeline = RecommendPipeline(bundle, store, PipelineOptions(strategy="knn_embed"))
    counts = np.zeros(bundle.clusters.n_clusters, np.float32)
    counts[5] = 1.0
    store.put_many(INTEREST_TABLE, [known_user], counts[None, :])
    store.delete(SMOOTHING_TABLE, [known_user])
    found = pipeline.generator.generate(
        known_user, 20, NONE, "knn_embed", MixtureKnobs(reserved_share=0.0)
    )
    size = bundle.clusters.cluster_sizes()[5]
    seen_there = int((bundle.mixtures.cluster_of(bundle.histories.get(known_user)) == 5).sum())
    assert [c for c in found.components if c is not None] == [5] * min(20, size - seen_there)


def test_http_reports_components_and_refuses_bad_knobs(artifact_root, known_user):
    settings = Settings(
        artifacts=artifact_root,
        host="127.0.0.1",
        grpc_port=free_port(),
        grpc_workers=2,
        strategy="knn_embed",
    )
    with TestClient(build_app(settings)) as http:
        body = http.post("/v1/candidates", json={"user_id": known_user, "candidates": 40}).json()
        components = [c["component"] for c in body["candidates"] if c["source"] == "knn_embed"]
        assert components and all(isinstance(c, int) for c in components)
        assert all(c["component"] is None for c in body["candidates"] if c["source"] != "knn_embed")
        single = http.post(
            "/v1/candidates",
            json={"user_id": known_user, "candidates": 40, "strategy": "two_tower"},
        ).json()
        assert {c["source"] for c in single["candidates"]} == {"two_tower"}
        reserved = http.post(
            "/v1/candidates",
            json={"user_id": known_user, "candidates": 40, "knn_embed": {"reserved_share": 1.0}},
        ).json()
        assert [c["item_id"] for c in reserved["candidates"]] == [
            c["item_id"] for c in single["candidates"]
        ]
        for knobs in (
            {"alpha": 1.5},
            {"components": 0},
            {"reserved_share": -0.1},
            {"m": 3},
            {"components": 2.5},
        ):
            response = http.post("/v1/candidates", json={"user_id": known_user, "knn_embed": knobs})
            assert response.status_code == 422, knobs
            assert "knn_embed" in response.text

        with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            stub = pb_grpc.RecommenderStub(channel)
            reply = stub.Candidates(
                pb.RecommendRequest(
                    user_id=known_user, candidates=40, knn_embed=pb.KnnEmbedOptions(components=2)
                )
            )
            from_interests = [c for c in reply.candidates if c.source == "knn_embed"]
            assert from_interests and all(c.HasField("component") for c in from_interests)
            assert len({c.component for c in from_interests}) <= 2
            assert not any(
                c.HasField("component") for c in reply.candidates if c.source != "knn_embed"
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.Candidates(
                    pb.RecommendRequest(user_id=known_user, knn_embed=pb.KnnEmbedOptions(alpha=2.0))
                )
            assert (
                refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                and "alpha" in refused.value.details()
            )


def test_a_click_moves_the_users_interests_toward_the_items_cluster(bundle, known_user):
    store = in_memory_store(bundle)
    updater = InterestUpdater(
        bundle.two_tower, bundle.features, store, bundle.clusters, bundle.mixtures, half_life=2.0
    )
    before = store.get_many(INTEREST_TABLE, [known_user]).vectors[0]
    item = bundle.features.items.ids[
        bundle.mixtures.cluster_of(bundle.features.items.ids) != np.argmax(before)
    ][0]
    cluster = int(bundle.mixtures.cluster_of([item])[0])
    updater.update(np.array([known_user, known_user], np.uint64), np.array([item, item], np.uint64))
    after = store.get_many(INTEREST_TABLE, [known_user]).vectors[0]
    decay = 0.5 ** (1 / 2.0)
    expected = before * decay * decay
    expected[cluster] += decay + 1.0
    np.testing.assert_allclose(after, expected, rtol=1e-5)

    # An item the artifact does not hold is placed by its table vector's nearest centroid.
    new_item = np.uint64(2**64 - 5)
    store.put_many(ITEM_TABLE, [new_item], store.get_many(ITEM_TABLE, [item]).vectors)
    assert updater.clusters_of(np.array([new_item], np.uint64))[0] == cluster
    newcomer = np.uint64(2**64 - 9)  # a user with no interests yet gets a row
    updater.update(np.array([newcomer], np.uint64), np.array([item], np.uint64))
    assert store.get_many(INTEREST_TABLE, [newcomer]).vectors[0].argmax() == cluster


def test_refresh_recomputes_smoothing_from_the_live_tables(bundle, known_user):
    store = in_memory_store(bundle)
    recent = InMemoryRecentItems(50)
    length = bundle.two_tower.config.history_length
    clicked = bundle.features.items.ids[:3]
    recent.push(np.full(3, known_user, np.uint64), clicked)
    generator = RecommendPipeline(bundle, store).generator
    generator.recent = recent
    # The batch job's vectors are the ones serving computes.
    live, known = live_user_vectors(
        bundle.two_tower, bundle.histories, store, recent, np.array([known_user], np.uint64), length
    )
    served, _ = generator.user_vector(known_user, generator.history(known_user)[0])
    assert known.all()
    np.testing.assert_allclose(live, served, atol=1e-6)

    # A user who arrived after the artifact: same row and items as another user, so the same
    # vector; refresh gives them smoothing like that user's.
    twin = int(bundle.histories.user_ids[7])
    newcomer = np.uint64(2**64 - 3)
    store.put_many(USER_TABLE, [newcomer], store.get_many(USER_TABLE, [twin]).vectors)
    recent.push(
        np.full(len(bundle.histories.get(twin)), newcomer, np.uint64), bundle.histories.get(twin)
    )
    store.put_many(INTEREST_TABLE, [newcomer], store.get_many(INTEREST_TABLE, [twin]).vectors)
    assert not store.get_many(SMOOTHING_TABLE, [newcomer]).found[0]
    store.delete(SMOOTHING_TABLE, bundle.mixtures.user_ids[:20])
    written = refresh_smoothing(bundle.two_tower, bundle.histories, store, recent, 10, length)
    assert written == len(bundle.mixtures.user_ids) + 1
    after = store.get_many(SMOOTHING_TABLE, bundle.mixtures.user_ids)
    assert after.found.all()  # the deleted rows are back
    # Nothing else changed for most users, so most rows are the artifact's again.
    same = np.isclose(after.vectors, bundle.mixtures.smoothing, atol=1e-5).all(1)
    assert same.mean() > 0.9
    twin_row, newcomer_row = store.get_many(SMOOTHING_TABLE, [twin, newcomer]).vectors
    assert (twin_row * newcomer_row).sum() > 0.8 * np.sqrt(
        (twin_row**2).sum() * (newcomer_row**2).sum()
    )


def test_catalog_items_without_interactions_are_retrievable_by_their_attributes(tiny_dataset):
    category = "c3"
    fans = tiny_dataset.interactions.merge(tiny_dataset.items, on="item_id").query(
        "category == @category"
    )
    fans = fans.groupby("user_id").size().loc[lambda s: s >= 8].index.to_numpy(np.uint64)
    cold = np.uint64(2**63 + 12345)
    items = pd.concat(
        [tiny_dataset.items, pd.DataFrame({"item_id": [cold], "category": [category]})],
        ignore_index=True,
    )
    bundle, _ = train(
        Dataset(tiny_dataset.name, tiny_dataset.interactions, items), tiny_train_config()
    )
    bundle.manifest = {"models": {"knn_embed": {}}}
    row = bundle.features.items.rows([cold])[0]
    assert row > 0 and bundle.features.item_counts[row] == 0
    assert not bundle.two_tower.item_id.weight[row].any()  # embedded from its attributes alone
    pipeline = RecommendPipeline(bundle)

    def rank(user: int) -> int:
        found = pipeline.generator.generate(int(user), 300, NONE).item_ids.tolist()
        return found.index(int(cold)) if int(cold) in found else 300

    others = np.setdiff1d(bundle.histories.user_ids, fans)[: len(fans)]
    assert len(fans) >= 5
    assert np.median([rank(u) for u in fans]) < np.median([rank(u) for u in others])
    assert sum(rank(u) < 100 for u in fans) >= len(fans) // 2
