"""Splits in time: train on each user's past, test on what came after (their latest 20%,
or their one last interaction)."""

import numpy as np
import pandas as pd

from service.data.schema import Dataset


def temporal_split(dataset: Dataset, holdout_fraction: float = 0.2) -> tuple[Dataset, pd.DataFrame]:
    """Hold out the last `holdout_fraction` of each user's interactions (by timestamp).

    Users keep at least one training interaction; a user with a single interaction has
    nothing held out. Returns the training dataset and the held-out interactions.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    frame = dataset.interactions  # sorted by user, then timestamp
    position = frame.groupby("user_id", sort=False).cumcount().to_numpy()
    count = frame.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    n_test = np.floor(count * holdout_fraction).astype(np.int64)
    n_test = np.minimum(n_test, count - 1)
    is_test = position >= count - n_test
    train = Dataset(dataset.name, frame[~is_test].reset_index(drop=True), dataset.items)
    return train, frame[is_test].reset_index(drop=True)


def leave_last_out(dataset: Dataset) -> tuple[Dataset, pd.DataFrame]:
    """Hold out each user's last interaction (the latest timestamp; ties in time go by item
    id, the largest last): the protocol of the sequential-recommendation literature.

    A user with a single interaction keeps it for training and has nothing held out.
    Returns the training dataset and the held-out interactions, one per user at most.
    """
    frame = dataset.interactions.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    count = frame.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    is_test = ~frame.duplicated("user_id", keep="last").to_numpy() & (count >= 2)
    frame = frame.reset_index(drop=True)
    train = Dataset(dataset.name, frame[~is_test].reset_index(drop=True), dataset.items)
    return train, frame[is_test].reset_index(drop=True)
