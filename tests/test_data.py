from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from service.data.files import load_dataset, load_files
from service.data.movielens import load_movielens_100k
from service.data.schema import DataError, Dataset
from service.data.split import temporal_split
from service.data.synthetic import SyntheticConfig, generate
from tests.conftest import MOVIELENS


def test_synthetic_is_reproducible_and_seed_dependent():
    config = SyntheticConfig(users=50, items=80, categories=5)
    a, b = generate(config), generate(config)
    c = generate(SyntheticConfig(users=50, items=80, categories=5, seed=1))
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    assert not a.interactions["item_id"].equals(c.interactions["item_id"])


def test_synthetic_users_have_planted_interests():
    data = generate(SyntheticConfig(users=100, items=400, categories=20, interests_per_user=(1, 2)))
    category = dict(zip(data.items["item_id"], data.items["category"]))
    per_user = (
        data.interactions.assign(c=data.interactions["item_id"].map(category))
        .groupby("user_id")["c"]
        .nunique()
    )
    assert per_user.max() <= 2  # only their interests, never all 20 categories


def test_temporal_split_holds_out_each_users_latest_fifth():
    frame = pd.DataFrame(
        {
            "user_id": [1] * 10 + [2] * 5 + [3],
            "item_id": list(range(10)) + list(range(5)) + [0],
            "timestamp": list(range(10, 0, -1)) + list(range(5)) + [7],
        }
    )
    train, test = temporal_split(Dataset("t", frame), 0.2)
    user1_test = test[test.user_id == 1]
    assert sorted(user1_test["timestamp"]) == [9, 10]  # the two latest of ten
    assert (
        train.interactions[train.interactions.user_id == 1]["timestamp"].max()
        < user1_test["timestamp"].min()
    )
    assert len(test[test.user_id == 2]) == 1
    assert len(test[test.user_id == 3]) == 0  # a single interaction stays in training
    assert len(train.interactions) + len(test) == len(frame)


def test_files_in_csv_and_parquet(tmp_path):
    frame = pd.DataFrame(
        {
            "user_id": [2**64 - 1, 5],
            "item_id": [3, 2**63],
            "timestamp": ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"],
        }
    )
    frame.astype({"user_id": "uint64", "item_id": "uint64"}).to_parquet(tmp_path / "i.parquet")
    frame.to_csv(tmp_path / "i.csv", index=False)
    pd.DataFrame({"item_id": [3, 2**63], "category": ["a|b", "c"]}).astype(
        {"item_id": "uint64"}
    ).to_parquet(tmp_path / "items.parquet")
    for name in ("i.parquet", "i.csv"):
        data = load_files(tmp_path / name, tmp_path / "items.parquet")
        assert set(data.interactions["user_id"].tolist()) == {2**64 - 1, 5}
        # sorted by user, then time: user 5 (2024-01-02) before user 2**64-1 (2024-01-01)
        assert data.interactions["timestamp"].tolist() == [1704153600, 1704067200]
        assert data.interactions["weight"].tolist() == [1.0, 1.0]
        assert data.attribute_columns == ["category"]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"user_id": [1], "item_id": [2]}), "lack column"),
        (pd.DataFrame({"user_id": [-1], "item_id": [2], "timestamp": [0]}), "negative"),
        (pd.DataFrame({"user_id": ["a"], "item_id": [2], "timestamp": [0]}), "integer ids"),
        (pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": ["yesterday"]}), "timestamp"),
        (pd.DataFrame({"user_id": [], "item_id": [], "timestamp": []}), "empty"),
    ],
)
def test_bad_interactions_are_refused_with_a_reason(frame, message):
    with pytest.raises(DataError, match=message):
        Dataset("bad", frame)


def test_dataset_specs():
    assert (
        len(
            load_dataset("synthetic:users=20,items=30,categories=3")
            .interactions["user_id"]
            .unique()
        )
        == 20
    )
    with pytest.raises(DataError, match="unknown synthetic option"):
        load_dataset("synthetic:colour=3")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("netflix")


@pytest.mark.skipif(
    not (MOVIELENS / "u.data").is_file(), reason="MovieLens-100K not present in ../shared/data"
)
def test_movielens_loader():
    data = load_movielens_100k(MOVIELENS)
    assert len(data.interactions) == 100_000
    assert data.interactions["user_id"].nunique() == 943
    assert len(data.items) == 1682
    toy_story = data.items.loc[data.items.item_id == 1, "genres"].item()
    assert toy_story == "Animation|Children|Comedy"
    assert np.all(
        np.diff(
            data.interactions.groupby("user_id").head(1000)["user_id"].to_numpy().astype(np.int64)
        )
        >= 0
    )


def test_a_drift_changes_only_what_comes_after_its_shift():
    base = SyntheticConfig(users=150, items=200, categories=6, seed=3)
    drifted = replace(base, drift_users=0.5, drift_items=20)
    plain, shifted = generate(base), generate(drifted)
    shift = drifted.drift_time

    def before(data):
        frame = data.interactions[data.interactions["timestamp"] < shift]
        return frame.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)

    assert before(plain).equals(before(shifted))
    arrived = shifted.items["item_id"].to_numpy()[base.items :]
    assert len(arrived) == 20 and not plain.interactions["item_id"].isin(arrived).any()
    after = shifted.interactions[shifted.interactions["timestamp"] >= shift]
    assert after["item_id"].isin(arrived).any()

    def users_in_a_new_category(data):
        frame = data.interactions.merge(data.items, on="item_id")
        early = frame[frame["timestamp"] < shift].groupby("user_id")["category"].agg(set)
        late = frame[frame["timestamp"] >= shift].groupby("user_id")["category"].agg(set)
        return sum(bool(late[u] - early.get(u, set())) for u in late.index)

    # Half the users swapped an interest: many more reach a category they never had.
    assert users_in_a_new_category(shifted) > 2 * users_in_a_new_category(plain)
    assert "drift_users=0.5" in shifted.name and "drift" not in plain.name
