"""Prequential replay of a drift: a third of the users swap an interest and new items
arrive partway through the replay. The artifact alone decays after the shift; the online
trainer (the service's default) learns the new items and interests from the clicks and
recovers, on real PyTorch training and a real FAISS index."""

from dataclasses import replace

import numpy as np
import pytest

from service.data.schema import Dataset
from service.data.split import temporal_split
from service.data.synthetic import generate
from service.prequential import replay
from service.training.artifact import train_and_save
from tests.conftest import TINY_DATA, tiny_train_config

DRIFT = replace(
    TINY_DATA,
    users=500,
    interactions_per_user=(20, 40),
    drift_users=0.33,
    drift_items=40,
    drift_at=0.85,
)


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    data = generate(DRIFT)
    train_part, test = temporal_split(data, 0.2)
    arrived = data.items["item_id"].to_numpy(np.uint64)[DRIFT.items :]
    interactions = train_part.interactions
    train_part = Dataset(
        train_part.name,
        interactions[~interactions["item_id"].isin(arrived)].reset_index(drop=True),
        train_part.items[~train_part.items["item_id"].isin(arrived)].reset_index(drop=True),
    )
    root = tmp_path_factory.mktemp("drift")
    return str(train_and_save(train_part, str(root), tiny_train_config())), test, arrived


def test_the_online_trainer_recovers_from_a_drift_that_the_artifact_alone_does_not(drifted):
    folder, test, arrived = drifted
    static, online = (
        replay(folder, test, arrived, mode, batch=128, shift=DRIFT.drift_time)
        for mode in ("static", "online")
    )
    assert static["drift"]["events_after_shift"] >= 300  # windows of 100 events or more
    static_windows = static["drift"]["hit_rate_at_50_after_shift_windows"]
    online_windows = online["drift"]["hit_rate_at_50_after_shift_windows"]
    # The artifact alone decays after the shift and does not come back ...
    assert max(static_windows) < 0.8 * static["drift"]["hit_rate_at_50_before_shift"]
    # ... the online service learns the arrived items, which the artifact cannot answer,
    # and by the last window it is further back than the artifact.
    assert online["hit_rate_at_50_new_items"] > 0.1
    assert static["hit_rate_at_50_new_items"] == 0.0
    assert online_windows[-1] > online_windows[0]
    assert online_windows[-1] >= static_windows[-1] + 0.03
