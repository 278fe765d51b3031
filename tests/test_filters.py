"""Filters: compiling them over the catalog's attributes, and searching inside them with
every index type (the exact path for few kept items, IVF's adaptive probing, HNSW's
selector), kNN-Embed's per-cluster search and the sources that select from lists."""

import faiss
import numpy as np
import pytest

from service.data.synthetic import unit_vectors_around_centres
from service.retrieval import index as index_module
from service.retrieval.catalog import ItemCatalog
from service.retrieval.index import ItemIndex, SearchParams
from service.retrieval.item_to_item import ItemNeighbours
from service.retrieval.knn_embed import ItemClusters
from service.retrieval.popular import PopularItems
from service.schemas import AttributeCondition, InvalidFilter, RecommendRequest

VALUES = ["colour=red", "colour=blue", "colour=green", "size=s", "size=m"]


def condition(**fields) -> AttributeCondition:
    return AttributeCondition.model_validate(fields)


@pytest.fixture
def catalog() -> ItemCatalog:
    """Items 10..15: 10 red s, 11 blue m, 12 red+blue (multi-valued), 13 green, 14 none, 15 m."""
    rows = np.zeros((7, 2), np.int64)
    rows[1] = [1, 4]
    rows[2] = [2, 5]
    rows[3] = [1, 2]
    rows[4] = [3, 0]
    rows[6] = [5, 0]
    return ItemCatalog(np.arange(10, 16, dtype=np.uint64), rows, VALUES)


def kept(catalog: ItemCatalog, **conditions) -> list[int]:
    allowed = catalog.allowed({k: condition(**v) for k, v in conditions.items()})
    return allowed.ids.tolist()


def test_in_not_in_and_their_conjunction_select_the_right_items(catalog):
    assert kept(catalog, colour={"in": ["red"]}) == [10, 12]
    assert kept(catalog, colour={"in": ["red", "green"]}) == [10, 12, 13]
    # An item with no value for the attribute holds none of the excluded ones.
    assert kept(catalog, colour={"not_in": ["red"]}) == [11, 13, 14, 15]
    assert kept(catalog, colour={"in": ["blue"], "not_in": ["red"]}) == [11]
    assert kept(catalog, colour={"not_in": ["green"]}, size={"in": ["m"]}) == [11, 15]
    assert kept(catalog, colour={"in": ["purple"]}) == []  # a value no item has: nothing
    allowed = catalog.allowed({"size": condition(**{"in": ["s"]})})
    assert allowed.share == pytest.approx(1 / 6)
    assert allowed.keeps(np.array([10, 11, 99], np.uint64)).tolist() == [True, False, False]


def test_an_unknown_attribute_is_refused_by_name(catalog):
    with pytest.raises(InvalidFilter, match="'weight'.*\\['colour', 'size'\\]"):
        catalog.allowed({"weight": condition(**{"in": ["1"]})})
    assert catalog.allowed(None) is None


def test_a_filter_is_compiled_once_whatever_its_order_and_the_cache_is_bounded(catalog):
    first = catalog.allowed(
        {"colour": condition(**{"in": ["red", "blue"]}), "size": condition(not_in=["s"])}
    )
    same = catalog.allowed(
        {"size": condition(not_in=["s"]), "colour": condition(**{"in": ["blue", "red", "red"]})}
    )
    assert same is first
    catalog.cache_bytes = first.nbytes  # room for about one filter
    other = catalog.allowed({"colour": condition(**{"in": ["green"]})})
    assert catalog.allowed({"colour": condition(**{"in": ["green"]})}) is other
    assert (
        catalog.allowed(
            {"size": condition(not_in=["s"]), "colour": condition(**{"in": ["red", "blue"]})}
        )
        is not first
    )


def test_a_request_filter_is_validated_by_the_contract():
    with pytest.raises(ValueError, match="needs `in`, `not_in` or both"):
        RecommendRequest.model_validate({"user_id": 1, "filter": {"colour": {}}})
    with pytest.raises(ValueError, match="at least 1 item"):
        RecommendRequest.model_validate({"user_id": 1, "filter": {"colour": {"in": []}}})
    with pytest.raises(ValueError, match="extra"):
        RecommendRequest.model_validate({"user_id": 1, "filter": {"colour": {"is": ["x"]}}})
    request = RecommendRequest.model_validate({"user_id": 1, "filter": {"colour": {"in": ["x"]}}})
    assert request.filter["colour"].in_ == ["x"]


CENTRES = 40


@pytest.fixture(scope="module")
def regions():
    """8,000 items around 40 centres, a `region` attribute naming each one's centre, and
    queries from the same centres."""
    vectors, centres = unit_vectors_around_centres(8_200, 16, CENTRES, seed=3)
    ids = np.arange(1, 8_001, dtype=np.uint64) * np.uint64(7_919)  # sparse 64-bit ids
    rows = np.zeros((8_001, 1), np.int64)
    rows[1:, 0] = centres[:8_000] + 1
    attributes = ItemCatalog(ids, rows, [f"region={c}" for c in range(CENTRES)])
    return ids, vectors[:8_000], centres[:8_000], vectors[8_000:], centres[8_000:], attributes


def exact_kept(ids, vectors, mask, queries, k):
    scores = queries @ vectors[mask].T
    best = np.argsort(-scores, axis=1)[:, :k]
    return ids[mask][best]


def recall(found, truth) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "HNSW16"])
@pytest.mark.parametrize("exact_up_to", [100_000, 100])  # the exact path, then the index's own
def test_filtered_search_finds_the_kept_items_nearest_to_the_query(
    factory, exact_up_to, regions, monkeypatch
):
    """The regions kept are far from most queries (their own region is left out): a search
    that probed as it would unfiltered finds almost none of them."""
    monkeypatch.setattr(index_module, "FLAT_MAX_ITEMS", exact_up_to)
    ids, vectors, centres, queries, query_centres, attributes = regions
    index = ItemIndex.build(ids, vectors, factory, SearchParams(nprobe=2))
    allowed = attributes.allowed({"region": condition(**{"in": ["3", "17", "29"]})})
    far = ~np.isin(query_centres, [3, 17, 29])
    mask = np.isin(centres, [3, 17, 29])
    scores, found = index.search(queries[far], 20, allowed)
    assert np.isfinite(scores).all() and allowed.keeps(found.ravel()).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    truth = exact_kept(ids, vectors, mask, queries[far], 20)
    assert recall(found, truth) >= (1.0 if exact_up_to > len(ids) else 0.95)
    if factory.startswith("IVF"):
        plain = faiss.SearchParametersIVF()
        plain.nprobe, plain.sel = 2, faiss.IDSelectorBatch(allowed.ids.view(np.int64))
        _, fixed = index._cpu.search(queries[far], 20, params=plain)
        assert recall(fixed.view(np.uint64), truth) < 0.5  # what the adaptive probes add


def test_a_filter_keeping_fewer_than_k_items_answers_them_and_pads(regions):
    ids, vectors, centres, queries, _, attributes = regions
    index = ItemIndex.build(ids, vectors, "IVF64,Flat")
    one_region = attributes.allowed({"region": condition(**{"in": ["5"]})})
    scores, found = index.search(queries[:3], len(one_region) + 10, one_region)
    assert sorted(found[0][np.isfinite(scores[0])].tolist()) == one_region.ids.tolist()
    assert (found[:, len(one_region) :] == 0).all() and np.isinf(scores[:, len(one_region) :]).all()
    nothing = attributes.allowed({"region": condition(**{"in": ["none"]})})
    scores, _ = index.search(queries[:1], 5, nothing)
    assert np.isinf(scores).all()


def test_filtered_vectors_follow_upserts_and_index_replacement(regions):
    """The kept items' vectors are read once per filter: an upsert after that must still be
    what the next search scores, whether patched in or (many upserts later) read again."""
    ids, vectors, centres, queries, _, attributes = regions
    index = ItemIndex.build(ids, vectors, "IVF64,Flat")
    allowed = attributes.allowed({"region": condition(**{"in": ["1", "2"]})})
    query = queries[:1]
    index.search(query, 5, allowed)
    target = allowed.ids[7:8]
    index.upsert(target, query)
    assert index.search(query, 1, allowed)[1][0, 0] == target[0]
    for _ in range(index_module.CHANGES_KEPT + 5):  # more than the change log keeps
        index.upsert(allowed.ids[20:21], vectors[np.searchsorted(ids, allowed.ids[20:21])])
    moved = allowed.ids[30:31]
    index.upsert(moved, query)
    assert set(index.search(query, 2, allowed)[1][0].tolist()) == {target[0], moved[0]}
    other = ItemIndex.build(ids, -vectors, "IVF64,Flat")
    index.replace_with(other)
    found = index.search(query, 5, allowed)[1][0]
    expected = exact_kept(ids, -vectors, np.isin(ids, allowed.ids), query, 5)[0]
    assert found.tolist() == expected.tolist()


def test_knn_embed_components_popular_and_item_to_item_keep_to_the_filter(regions):
    ids, vectors, centres, queries, _, attributes = regions
    allowed = attributes.allowed({"region": condition(not_in=["0", "1", "2", "3"])})
    clusters = ItemClusters.build(ids, vectors, 8)
    scores, found = clusters.search_components(queries[0], np.arange(8), 50, allowed)
    unfiltered_scores, unfiltered = clusters.search_components(queries[0], np.arange(8), 8_000)
    for row in range(8):
        valid = np.isfinite(scores[row])
        assert allowed.keeps(found[row][valid]).all()
        expected = unfiltered[row][
            allowed.keeps(unfiltered[row]) & np.isfinite(unfiltered_scores[row])
        ]
        assert found[row][valid].tolist() == expected[:50].tolist()
    popular = PopularItems("v", ids[::-1].copy(), np.zeros(len(ids), np.float32))
    top = popular.top(10, np.empty(0, np.uint64), allowed)
    assert allowed.keeps(top.item_ids).all() and len(top) == 10
    assert (
        top.item_ids.tolist()
        == [i for i in ids[::-1].tolist() if allowed.keeps(np.array([i], np.uint64))[0]][:10]
    )
    neighbours = ItemNeighbours(
        ids, np.tile(np.arange(40), (len(ids), 1)), np.ones((len(ids), 40), np.float32)
    )
    near, _ = neighbours.top(ids[:3], 40, np.empty(0, np.uint64), allowed)
    assert allowed.keeps(near).all() and set(near.tolist()) == set(
        ids[:40][allowed.keeps(ids[:40])].tolist()
    )
