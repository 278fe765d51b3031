import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from service.data.feature_space import FeatureSpace
from service.data.schema import Dataset
from service.retrieval.candidates import is_in_sorted
from service.retrieval.index import ItemIndex, SearchParams
from service.retrieval.two_tower import (
    TwoTower,
    TwoTowerConfig,
    UserTowerKernel,
    history_before,
    in_batch_softmax_loss,
    sequence_windows,
    without_some,
)


def test_in_batch_loss_applies_logq_and_masks_accidental_hits():
    torch.manual_seed(0)
    user = F.normalize(torch.randn(4, 8), dim=-1)
    item = F.normalize(torch.randn(4, 8), dim=-1)
    rows = torch.tensor([3, 5, 3, 9])  # rows 0 and 2 share a positive item
    log_q = torch.tensor([-1.0, -2.0, -1.0, -3.0])
    logits = user @ item.T / 0.1 - log_q
    logits[0, 2] = logits[2, 0] = float("-inf")
    expected = F.cross_entropy(logits, torch.arange(4))
    actual = in_batch_softmax_loss(user, item, rows, log_q, 0.1)
    torch.testing.assert_close(actual, expected)


def test_history_holds_only_earlier_items():
    frame = pd.DataFrame(
        {"user_id": [1, 1, 1, 2], "item_id": [10, 11, 12, 10], "timestamp": [1, 2, 3, 1]}
    )
    data = Dataset("t", frame)
    space = FeatureSpace.build(data)
    users, items, history = history_before(data.interactions, space, length=2)
    row = space.items.rows(np.array([10, 11, 12], dtype=np.uint64)).tolist()
    assert history.tolist() == [[0, 0], [0, row[0]], [row[0], row[1]], [0, 0]]
    assert items.tolist() == [row[0], row[1], row[2], row[0]]


@pytest.mark.parametrize("tower", ["mean", "sequence"])
def test_serving_user_tower_matches_the_torch_tower(tower):
    torch.manual_seed(0)
    config = TwoTowerConfig(
        id_dim=16, hidden=32, out_dim=8, history_length=6, user_tower=tower, sequence_heads=2
    )
    model = TwoTower(config, 3, 3, 3).eval()
    users, history = torch.randn(5, 16), torch.randn(5, 6, 16)
    valid = torch.ones(5, 6, dtype=torch.bool)
    valid[1, :4] = False  # a short history, left-padded
    valid[2, 2] = False  # a row the table lacks, in the middle
    valid[3] = False  # no history at all
    history[4, -1] = -users[4]  # and a row whose first layer input may sum to little
    with torch.no_grad():
        expected = model.user_tower(users, history, valid).numpy()
    kernel = UserTowerKernel(model)
    np.testing.assert_allclose(
        kernel(users.numpy(), history.numpy(), valid.numpy()), expected, atol=1e-5
    )
    # Serving passes only the rows a history has: the same vector as the padded batch.
    np.testing.assert_allclose(
        kernel(users[1:2].numpy(), history[1:2, 4:].numpy(), valid[1:2, 4:].numpy()),
        expected[1:2],
        atol=1e-5,
    )
    empty = kernel(users[3:4].numpy(), np.zeros((1, 0, 16), np.float32), np.zeros((1, 0), bool))
    np.testing.assert_allclose(empty, expected[3:4], atol=1e-5)


def test_sequence_windows_make_every_later_interaction_a_target_once():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "user_id": [1] * 9 + [2] * 2 + [3],
            "item_id": list(range(10, 19)) + [10, 11, 12],
            "timestamp": list(range(9)) + [0, 1, 0],
        }
    )
    data = Dataset("t", frame)
    space = FeatureSpace.build(data)
    for _ in range(5):  # the cuts move with the random offset; the invariants do not
        users, inputs, targets = sequence_windows(data.interactions, space, 4, rng)
        assert inputs.shape == targets.shape == (len(users), 4)
        for owner in (1, 2):
            rows = space.items.rows(
                frame.loc[frame.user_id == owner, "item_id"].to_numpy(np.uint64)
            )
            mine = users == space.users.rows(np.array([owner], np.uint64))[0]
            # Each interaction but the first is a target exactly once...
            assert sorted(targets[mine][targets[mine] > 0].tolist()) == sorted(rows[1:].tolist())
            # ...and its input slot holds the interaction just before it.
            for window_inputs, window_targets in zip(inputs[mine], targets[mine]):
                for slot in np.flatnonzero(window_targets):
                    at = rows.tolist().index(window_targets[slot])
                    assert window_inputs[slot] == rows[at - 1]
                    before = window_inputs[: slot + 1][window_inputs[: slot + 1] > 0]
                    assert before.tolist() == rows[max(0, at - len(before)) : at].tolist()
        # A user with one interaction has nothing to predict.
        assert space.users.rows(np.array([3], np.uint64))[0] not in users


def test_user_id_dropout_zeroes_a_share_of_rows_and_draws_nothing_when_off():
    rows = torch.arange(1, 10_001)
    state = torch.random.get_rng_state()
    assert without_some(rows, 0.0) is rows
    assert torch.equal(torch.random.get_rng_state(), state)  # training without it is unchanged
    dropped = without_some(rows, 0.25)
    zeroed = dropped == 0
    assert 0.22 < zeroed.float().mean().item() < 0.28
    assert torch.equal(dropped[~zeroed], rows[~zeroed])


def test_membership_in_a_sorted_set_covers_the_extreme_ids():
    members = np.array([0, 7, 2**63, 2**64 - 1], dtype=np.uint64)
    values = np.array([[0, 1, 2**64 - 1], [2**63, 2**63 + 1, 8]], dtype=np.uint64)
    assert is_in_sorted(values, members).tolist() == [[True, False, True], [True, False, False]]
    assert not is_in_sorted(values, np.empty(0, np.uint64)).any()


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_index_returns_real_64_bit_ids_like_exact_search(factory, tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    ids = rng.integers(2**63, 2**64 - 1, size=2000, dtype=np.uint64)  # all above int64 max
    index = ItemIndex.build(ids, vectors, factory, SearchParams(nprobe=16))
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    scores, found = index.search(queries, 10)
    exact = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    assert found.dtype == np.uint64
    np.testing.assert_array_equal(found, exact)  # nprobe = nlist: IVF is exact too
    index.save(tmp_path / "i.faiss")
    np.testing.assert_array_equal(
        ItemIndex.load(tmp_path / "i.faiss", SearchParams(nprobe=16)).search(queries, 10)[1], found
    )


def test_search_past_the_catalog_pads_nothing():
    index = ItemIndex.build(np.array([7, 8], dtype=np.uint64), np.eye(2, dtype=np.float32))
    scores, ids = index.search(np.array([[1.0, 0.0]], np.float32), 10)
    assert ids.tolist() == [[7, 8]]


def test_two_tower_learns_the_planted_interests(bundle, tiny_dataset):
    losses = bundle.manifest["metrics"]["two_tower"]["train_loss"]
    assert losses[-1] < losses[0]
    # items of one category sit closer to each other than to other categories
    vectors = bundle.index.reconstruct(tiny_dataset.items["item_id"].to_numpy())
    category = tiny_dataset.items["category"].to_numpy()
    similarity = vectors @ vectors.T
    same = category[:, None] == category[None, :]
    np.fill_diagonal(same, False)
    different = category[:, None] != category[None, :]
    assert similarity[same].mean() > similarity[different].mean() + 0.1
