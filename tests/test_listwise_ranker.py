"""The ranker trained on validation's candidate lists: it starts as retrieval order, learns
what the lists hold that retrieval's order lacks, and places items as serving sorts them."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from service.data.feature_space import FeatureSpace
from service.evaluation import hit_and_ndcg, hit_and_ndcg_of_places
from service.ranking.encoder import RankingEncoder
from service.training.ranker import (
    CandidateLists,
    RankerTrainConfig,
    ranked_places,
    train_listwise_ranker,
)

LENGTH = 20
SCALE = 20.0  # 1 / the two-tower temperature


@pytest.fixture(scope="module")
def features(tiny_dataset) -> FeatureSpace:
    return FeatureSpace.build(tiny_dataset)


def random_lists(features: FeatureSpace, n: int, seed: int, target_of) -> CandidateLists:
    """`n` lists of `LENGTH` distinct items with unsorted scores (as interleaved sources
    give them); `target_of(item_rows)` picks each list's interacted place."""
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(features.items.ids, LENGTH, replace=False) for _ in range(n)])
    targets = np.array([target_of(features.items.rows(row)) for row in items])
    return CandidateLists(
        rng.choice(features.users.ids, n),
        items,
        np.ones((n, LENGTH), bool),
        rng.uniform(-0.2, 0.6, (n, LENGTH)).astype(np.float32),
        targets,
        rng.integers(1, 25, n),
        rng.integers(1, 8, n),
    )


class ConstantModel(torch.nn.Module):
    def forward(self, categorical, attributes, numeric):
        return torch.zeros(len(categorical))


def test_places_of_tied_scores_keep_retrieval_order(features):
    lists = random_lists(features, 30, 0, lambda rows: 7)
    lists.targets[:5] = -1  # retrieval missed these
    places = ranked_places(ConstantModel(), RankingEncoder(features, SCALE), lists)
    assert places.tolist() == lists.targets.tolist()


def test_an_untrained_listwise_ranker_is_retrieval_order(features):
    rng = np.random.default_rng(1)
    lists = random_lists(features, 200, 1, lambda rows: int(rng.integers(LENGTH)))
    config = replace(RankerTrainConfig(), epochs=0)
    model, metrics, _ = train_listwise_ranker(lists, features, config, SCALE)
    assert metrics["best_epoch"] == 0
    places = ranked_places(model, RankingEncoder(features, SCALE), lists)
    # Not the order of the scores, which the lists do not follow: the order they came in.
    assert places.tolist() == lists.targets.tolist()


def test_the_listwise_ranker_learns_what_retrieval_order_lacks(features):
    """The interacted item is each list's most popular one, at any place: retrieval order
    finds it first in 1 list of 20, the ranker learns the popularity field."""

    def most_popular(rows: np.ndarray) -> int:
        return int(np.argmax(features.item_log_popularity[rows]))

    train_lists = random_lists(features, 600, 2, most_popular)
    fresh = random_lists(features, 300, 3, most_popular)
    model, metrics, rows = train_listwise_ranker(
        train_lists, features, replace(RankerTrainConfig(), epochs=6), SCALE
    )
    places = ranked_places(model, RankingEncoder(features, SCALE), fresh)
    assert metrics["best_epoch"] > 0
    assert (places == 0).mean() > 0.5 > 3 * (fresh.targets == 0).mean()
    # The rows handed on to compression: one per candidate, one positive per list.
    assert len(rows.labels) == len(train_lists) * LENGTH
    assert rows.labels.sum() == len(train_lists)


def test_list_rows_map_ids_to_the_feature_space_and_skip_empty_places(features):
    lists = random_lists(features, 3, 4, lambda rows: 2)
    lists.present[1, 10:] = False
    lists.item_ids[2, 0] = np.uint64(2**63 + 12345)  # an id the feature space lacks
    rows = lists.rows(features, np.array([True, False, False]))
    assert len(rows.labels) == 3 * LENGTH - 10
    assert rows.labels.sum() == 3
    assert rows.item_rows[2 * LENGTH - 10] == 0  # unknown: the default row
    assert rows.validation.sum() == LENGTH
    assert rows.ranks[:LENGTH].tolist() == list(range(LENGTH))


def test_hit_and_ndcg_of_places_agree_with_the_lists():
    ranking = [4, 8, 15, 16, 23, 42, 7, 9, 11, 13, 17, 19]
    targets = [4, 23, 19, 99]
    places = np.array([ranking.index(t) if t in ranking else -1 for t in targets])
    figures = hit_and_ndcg_of_places(places)
    for k in (10, 20):
        per_target = [hit_and_ndcg(ranking, t, (k,))[k] for t in targets]
        assert figures["hit_rate"][f"@{k}"] == round(np.mean([h for h, _ in per_target]), 4)
        assert figures["ndcg"][f"@{k}"] == round(np.mean([g for _, g in per_target]), 4)
