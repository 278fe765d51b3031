"""Click-through tables built from interaction datasets, for training and comparing CTR
models: every interaction is a positive, each gets sampled negatives (items the user never
interacted with, in the same context), and the split is temporal."""

import numpy as np
import pandas as pd

from service.data.context import context_rows
from service.data.schema import Dataset

SPLIT_SHARES = (0.8, 0.1, 0.1)  # train, dev, test by time


def interactions_as_ctr(dataset: Dataset, negatives: int = 4, seed: int = 0) -> pd.DataFrame:
    """Columns user_id, item_id (strings: categorical fields), hour, weekday, the item
    attributes (multi-valued strings), label, and split (train / dev / test by the
    positive's timestamp: the oldest 80%, the next 10%, the latest 10%)."""
    rng = np.random.default_rng(seed)
    frame = dataset.interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
    n = len(frame)
    cuts = np.floor(np.cumsum(SPLIT_SHARES)[:-1] * n).astype(int)
    split = np.full(n, "test", dtype=object)
    split[: cuts[0]], split[cuts[0] : cuts[1]] = "train", "dev"
    catalog = np.union1d(frame["item_id"].to_numpy(), dataset.items["item_id"].to_numpy()).astype(
        np.uint64
    )
    seen = set(zip(frame["user_id"].to_numpy().tolist(), frame["item_id"].to_numpy().tolist()))
    users = np.repeat(frame["user_id"].to_numpy(), negatives)
    drawn = catalog[rng.integers(0, len(catalog), len(users))]
    # Redraw the few negatives the user did interact with (at any time).
    for i in np.flatnonzero([(u, d) in seen for u, d in zip(users.tolist(), drawn.tolist())]):
        while (int(users[i]), int(drawn[i])) in seen:
            drawn[i] = catalog[rng.integers(0, len(catalog))]
    hour, weekday = context_rows(frame["timestamp"].to_numpy())
    rows = pd.DataFrame(
        {
            "user_id": np.concatenate([frame["user_id"].to_numpy(), users]),
            "item_id": np.concatenate([frame["item_id"].to_numpy(), drawn]),
            "hour": np.concatenate([hour, np.repeat(hour, negatives)]) - 1,
            "weekday": np.concatenate([weekday, np.repeat(weekday, negatives)]) - 1,
            "label": np.r_[np.ones(n, np.int8), np.zeros(n * negatives, np.int8)],
            "split": np.concatenate([split, np.repeat(split, negatives)]),
        }
    )
    rows = rows.merge(dataset.items, on="item_id", how="left")
    for column in ("user_id", "item_id", "hour", "weekday"):
        rows[column] = rows[column].astype(str)
    for column in dataset.attribute_columns:
        rows[column] = rows[column].fillna("")
    return rows
