"""Temporal splits: train on each user's past, test on their later interactions."""

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
