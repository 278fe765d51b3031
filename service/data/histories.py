"""What each user interacted with, oldest first: pooled into the user vector, and excluded
from their recommendations."""

from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file


class UserHistories:
    def __init__(self, user_ids: np.ndarray, offsets: np.ndarray, items: np.ndarray):
        self._user_ids = np.asarray(user_ids, dtype=np.uint64)  # sorted
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._items = np.asarray(items, dtype=np.uint64)

    @classmethod
    def from_interactions(cls, interactions: pd.DataFrame) -> "UserHistories":
        frame = interactions.sort_values(["user_id", "timestamp"], kind="stable")
        users, counts = np.unique(frame["user_id"].to_numpy(np.uint64), return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return cls(users, offsets, frame["item_id"].to_numpy(np.uint64))

    def __len__(self) -> int:
        return len(self._user_ids)

    @property
    def user_ids(self) -> np.ndarray:
        return self._user_ids

    @property
    def offsets(self) -> np.ndarray:
        """User i's items are `items[offsets[i]:offsets[i + 1]]`."""
        return self._offsets

    @property
    def items(self) -> np.ndarray:
        return self._items

    def get(self, user_id: int) -> np.ndarray:
        pos = int(np.searchsorted(self._user_ids, np.uint64(user_id)))
        if pos == len(self._user_ids) or self._user_ids[pos] != np.uint64(user_id):
            return np.empty(0, dtype=np.uint64)
        return self._items[self._offsets[pos] : self._offsets[pos + 1]]

    def save(self, path: Path) -> None:
        save_file(
            {"user_ids": self._user_ids, "offsets": self._offsets, "items": self._items}, path
        )

    @classmethod
    def load(cls, path: Path) -> "UserHistories":
        arrays = load_file(path)
        return cls(arrays["user_ids"], arrays["offsets"], arrays["items"])
