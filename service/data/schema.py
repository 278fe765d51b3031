"""The generic input format every loader produces.

interactions: `user_id`, `item_id` (uint64), `timestamp` (int64 seconds since the epoch),
`weight` (float32, 1.0 when the source has none).
items: `item_id` plus attribute columns; an attribute value is a string, several values
of one attribute are joined with `|` (e.g. genres "Action|Comedy").
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ATTRIBUTE_SEPARATOR = "|"
MAX_ID = np.iinfo(np.uint64).max


class DataError(ValueError):
    """Input data that cannot be used, with a message that says why."""


@dataclass
class Dataset:
    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"item_id": []}))

    def __post_init__(self) -> None:
        self.interactions = normalize_interactions(self.interactions)
        self.items = normalize_items(self.items)

    @property
    def attribute_columns(self) -> list[str]:
        return [c for c in self.items.columns if c != "item_id"]

    def schema(self) -> dict:
        return {
            "name": self.name,
            "interactions": int(len(self.interactions)),
            "users": int(self.interactions["user_id"].nunique()),
            "items": int(self.interactions["item_id"].nunique()),
            "catalog_items": int(len(self.items)),
            "item_attributes": self.attribute_columns,
            "columns": list(self.interactions.columns),
        }


def _as_uint64(column: pd.Series, name: str) -> np.ndarray:
    if column.isna().any():
        raise DataError(f"column {name!r} has missing values")
    if column.dtype.kind == "u":
        return column.to_numpy(np.uint64)
    if column.dtype.kind == "i":
        if (column < 0).any():
            raise DataError(f"column {name!r} has negative ids; ids are unsigned 64-bit integers")
        return column.to_numpy(np.int64).astype(np.uint64)
    try:
        values = [int(v) for v in column]
    except (TypeError, ValueError) as exc:
        raise DataError(f"column {name!r} must hold integer ids: {exc}") from None
    if values and (min(values) < 0 or max(values) > MAX_ID):
        raise DataError(f"column {name!r} has ids outside the unsigned 64-bit range")
    return np.array(values, dtype=np.uint64)


def normalize_interactions(frame: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in INTERACTION_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"interactions lack column(s) {missing}; expected {list(INTERACTION_COLUMNS)} "
            "and optionally 'weight'"
        )
    if frame["timestamp"].isna().any():
        raise DataError("column 'timestamp' has missing values")
    timestamps = frame["timestamp"]
    if timestamps.dtype.kind not in "iu":
        if timestamps.dtype.kind == "f":
            timestamps = timestamps.astype(np.int64)
        else:
            parsed = pd.to_datetime(timestamps, utc=True, errors="coerce")
            if parsed.isna().any():
                raise DataError("column 'timestamp' must hold epoch seconds or ISO-8601 times")
            timestamps = parsed.dt.as_unit("s").astype("int64")
    weight = frame["weight"] if "weight" in frame.columns else pd.Series(1.0, index=frame.index)
    out = pd.DataFrame(
        {
            "user_id": _as_uint64(frame["user_id"], "user_id"),
            "item_id": _as_uint64(frame["item_id"], "item_id"),
            "timestamp": np.asarray(timestamps, dtype=np.int64),
            "weight": np.asarray(weight, dtype=np.float32),
        }
    )
    if len(out) == 0:
        raise DataError("interactions are empty")
    return out.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)


def normalize_items(frame: pd.DataFrame) -> pd.DataFrame:
    if "item_id" not in frame.columns:
        raise DataError("items lack the column 'item_id'")
    out = frame.copy()
    out["item_id"] = _as_uint64(out["item_id"], "item_id")
    if out["item_id"].duplicated().any():
        raise DataError("items list an item_id more than once")
    for column in out.columns:
        if column != "item_id":
            out[column] = out[column].fillna("").astype(str)
    return out.reset_index(drop=True)
