"""The item-to-item source: neighbours by cosine-normalised co-occurrence, their sums over a
user's latest items, and their share of the candidates interleaved with the vector search's."""

import numpy as np
import pandas as pd

from service.pipeline.in_process import PipelineOptions, RecommendPipeline
from service.retrieval.candidates import SOURCE_ITEM_TO_ITEM, SOURCE_TWO_TOWER, Candidates, labels
from service.retrieval.item_to_item import ItemNeighbours, interleaved
from service.schemas import RecommendRequest


def brute_force_similarity(frame: pd.DataFrame, items: np.ndarray) -> np.ndarray:
    seen = np.zeros((frame["user_id"].nunique(), len(items)))
    users = pd.factorize(frame["user_id"])[0]
    seen[users, np.searchsorted(items, frame["item_id"].to_numpy(np.uint64))] = 1.0
    together = seen.T @ seen
    counts = np.sqrt(np.maximum(np.diag(together), 1.0))
    similarity = together / counts[:, None] / counts[None, :]
    np.fill_diagonal(similarity, 0.0)
    return similarity


def test_neighbours_are_the_most_co_occurring_items():
    rng = np.random.default_rng(0)
    items = np.unique(rng.integers(2**63, 2**64 - 1, size=40, dtype=np.uint64))  # above int64
    frame = pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(60), 6),
            "item_id": rng.choice(items[:35], 360),  # five catalogue items nobody saw
            "timestamp": np.tile(np.arange(6), 60),
        }
    )
    neighbours = ItemNeighbours.build(frame, items, neighbours=5)
    expected = brute_force_similarity(frame, items)
    for row in range(len(items)):
        kept = neighbours.neighbours[row][neighbours.neighbours[row] >= 0]
        strongest = np.sort(expected[row])[::-1][: len(kept)]
        np.testing.assert_allclose(neighbours.similarity[row][: len(kept)], strongest, rtol=1e-5)
        np.testing.assert_allclose(expected[row, kept], strongest, rtol=1e-5)
        assert row not in kept
    assert (neighbours.neighbours[35:] == -1).all()  # never seen: no neighbours

    history = items[[0, 3, 7]]
    excluded = np.sort(items[[0, 3, 7, 11]])
    ids, scores = neighbours.top(history, 6, excluded)
    # The sum over the history of each neighbour's similarity, for the neighbours kept.
    totals = np.zeros(len(items))
    for row in (0, 3, 7):
        kept = neighbours.neighbours[row] >= 0
        np.add.at(totals, neighbours.neighbours[row][kept], neighbours.similarity[row][kept])
    totals[[0, 3, 7, 11]] = 0.0
    best = np.argsort(-totals, kind="stable")[: len(ids)]
    np.testing.assert_allclose(scores, totals[best], rtol=1e-5)
    assert not set(ids.tolist()) & set(excluded.tolist())
    unknown = np.array([12345], np.uint64)  # not in the catalogue: adds nothing
    assert len(neighbours.top(unknown, 5, np.empty(0, np.uint64))[0]) == 0


def candidates(ids, source) -> Candidates:
    ids = np.asarray(ids, np.uint64)
    return Candidates(ids, np.zeros(len(ids), np.float32), labels(source, len(ids)))


def test_interleaving_spreads_the_share_and_keeps_the_first_of_a_duplicate():
    vector = candidates([1, 2, 3, 4, 5, 6], SOURCE_TWO_TOWER)
    similar = candidates([9, 2, 8, 7], SOURCE_ITEM_TO_ITEM)
    half = interleaved(vector, similar, 0.5, 6)
    assert half.item_ids.tolist() == [1, 9, 2, 3, 8, 4]  # 2 came from the vector first
    assert half.sources.tolist() == [
        SOURCE_TWO_TOWER,
        SOURCE_ITEM_TO_ITEM,
        SOURCE_TWO_TOWER,
        SOURCE_TWO_TOWER,
        SOURCE_ITEM_TO_ITEM,
        SOURCE_TWO_TOWER,
    ]
    assert interleaved(vector, similar, 0.0, 4).item_ids.tolist() == [1, 2, 3, 4]
    # All of it: the source's own first, the vector's after it runs out.
    assert interleaved(vector, similar, 1.0, 6).item_ids.tolist() == [9, 2, 8, 7, 1, 3]
    quarter = interleaved(vector, similar, 0.25, 8)
    assert (quarter.sources == SOURCE_ITEM_TO_ITEM).sum() == 2


def test_the_pipeline_serves_the_share_it_is_given(bundle, known_user):
    assert bundle.neighbours is not None  # trained into the artifact, loaded back
    history = bundle.histories.get(known_user)
    asked = RecommendRequest(user_id=known_user, k=40, candidates=40)
    by_share = {}
    for share in (0.0, 0.5, 1.0):
        pipeline = RecommendPipeline(bundle, options=PipelineOptions(item_to_item_share=share))
        found = pipeline.candidates(asked).candidates
        by_share[share] = found
        assert len(found) == 40 and not {c.item_id for c in found} & set(history.tolist())
    sources = {share: [c.source for c in found] for share, found in by_share.items()}
    assert SOURCE_ITEM_TO_ITEM not in sources[0.0]
    ids, _ = bundle.neighbours.top(history[-50:], 40, np.unique(history))
    assert [c.item_id for c in by_share[1.0]][: len(ids)] == ids.tolist()
    vector_only = candidates([c.item_id for c in by_share[0.0]], SOURCE_TWO_TOWER)
    expected = interleaved(vector_only, candidates(ids, SOURCE_ITEM_TO_ITEM), 0.5, 40)
    assert [c.item_id for c in by_share[0.5]] == expected.item_ids.tolist()
    assert sources[0.5] == expected.sources.tolist()
    assert 10 <= sources[0.5].count(SOURCE_ITEM_TO_ITEM) <= 20  # less where both found one
    # Its candidates carry their cosine with the user vector, as the vector search's do.
    user_vector, _ = RecommendPipeline(bundle).generator.user_vector(known_user, history)
    first = by_share[1.0][0]
    vector = bundle.index.reconstruct(np.array([first.item_id], np.uint64))[0]
    np.testing.assert_allclose(first.score, float(vector @ user_vector[0]), rtol=1e-4, atol=1e-5)
    # Without a setting, the share is what validation chose (none here: trained without).
    default = RecommendPipeline(bundle).candidates(asked).candidates
    assert [c.item_id for c in default] == [c.item_id for c in by_share[0.0]]
