"""The feature space both models share: id vocabularies, item attributes, popularity.

Raw 64-bit ids map to model rows through sorted vocabularies; row 0 is reserved for ids
the model never saw, so an unknown id is a default, never an error.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from service.data.schema import ATTRIBUTE_SEPARATOR, Dataset

MAX_ATTRIBUTES_PER_ITEM = 16


class IdVocabulary:
    """Sorted raw uint64 ids; `rows(ids)` gives 1-based rows, 0 for unknown ids."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.unique(np.asarray(ids, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        """Rows a table needs, including the unknown row 0."""
        return len(self.ids) + 1

    def rows(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.uint64)
        pos = np.searchsorted(self.ids, ids)
        pos_clipped = np.minimum(pos, len(self.ids) - 1)
        known = (pos < len(self.ids)) & (self.ids[pos_clipped] == ids)
        return np.where(known, pos_clipped + 1, 0).astype(np.int64)


@dataclass
class FeatureSpace:
    users: IdVocabulary
    items: IdVocabulary  # every catalog item: interacted or listed in the items file
    attribute_values: list[str]  # "column=value", row i+1 in attribute embeddings
    item_attributes: np.ndarray  # (items.size, MAX_ATTRIBUTES_PER_ITEM) rows, 0 = padding
    item_counts: np.ndarray  # (items.size,) training interactions per item row

    @property
    def attribute_size(self) -> int:
        return len(self.attribute_values) + 1

    @property
    def item_log_popularity(self) -> np.ndarray:
        return np.log1p(self.item_counts).astype(np.float32)

    @classmethod
    def build(cls, dataset: Dataset) -> "FeatureSpace":
        frame = dataset.interactions
        items = IdVocabulary(
            np.concatenate([frame["item_id"].to_numpy(), dataset.items["item_id"].to_numpy()])
        )
        values: dict[str, int] = {}
        item_attributes = np.zeros((items.size, MAX_ATTRIBUTES_PER_ITEM), dtype=np.int64)
        item_rows = items.rows(dataset.items["item_id"].to_numpy())
        for column in dataset.attribute_columns:
            for row, cell in zip(item_rows, dataset.items[column]):
                for value in filter(None, cell.split(ATTRIBUTE_SEPARATOR)):
                    index = values.setdefault(f"{column}={value}", len(values) + 1)
                    free = np.flatnonzero(item_attributes[row] == 0)
                    if len(free):
                        item_attributes[row, free[0]] = index
        counts = np.bincount(items.rows(frame["item_id"].to_numpy()), minlength=items.size)
        return cls(
            users=IdVocabulary(frame["user_id"].to_numpy()),
            items=items,
            attribute_values=list(values),
            item_attributes=item_attributes,
            item_counts=counts.astype(np.int64),
        )

    def save(self, folder: Path) -> list[str]:
        save_file(
            {
                "user_ids": self.users.ids,
                "item_ids": self.items.ids,
                "item_attributes": self.item_attributes,
                "item_counts": self.item_counts,
            },
            folder / "features.safetensors",
        )
        (folder / "features.json").write_text(
            json.dumps({"attribute_values": self.attribute_values})
        )
        return ["features.safetensors", "features.json"]

    @classmethod
    def load(cls, folder: Path) -> "FeatureSpace":
        arrays = load_file(folder / "features.safetensors")
        meta = json.loads((folder / "features.json").read_text())
        return cls(
            users=IdVocabulary(arrays["user_ids"]),
            items=IdVocabulary(arrays["item_ids"]),
            attribute_values=meta["attribute_values"],
            item_attributes=arrays["item_attributes"],
            item_counts=arrays["item_counts"],
        )
