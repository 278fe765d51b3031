"""The field map of a CTR model: which columns are fields, and how a row's values become
model inputs.

Built from the training split only. A categorical field keeps the values seen at least
`min_count` times there, each its own row (1-based, in order of frequency); every other
value (rare, unseen, missing) is row 0, the field's default, so unknown input is never an
error. A multi-valued field (e.g. genres "Action|Comedy") is one such vocabulary whose
values a row may hold several of. A numeric field is log-compressed (heavy-tailed counts),
then standardised with the training mean and deviation; a missing value becomes the mean.
"""

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from service.data.schema import ATTRIBUTE_SEPARATOR, DataError


@dataclass
class CategoricalField:
    name: str
    values: list[str]  # row i + 1 holds values[i]

    @property
    def size(self) -> int:
        """Rows, including the default row 0."""
        return len(self.values) + 1

    def rows(self, column: pd.Series) -> np.ndarray:
        positions = pd.Index(self.values, dtype="string").get_indexer(
            column.astype("string").fillna("")
        )  # -1: not a value
        return positions.astype(np.int64) + 1


@dataclass
class NumericField:
    name: str
    mean: float
    std: float

    @staticmethod
    def compress(column: pd.Series) -> np.ndarray:
        values = pd.to_numeric(column, errors="coerce").to_numpy(np.float64)
        return np.sign(values) * np.log1p(np.abs(values))

    def encode(self, column: pd.Series) -> np.ndarray:
        values = (self.compress(column) - self.mean) / self.std
        return np.nan_to_num(values, nan=0.0).astype(np.float32)


@dataclass
class EncodedRows:
    categorical: np.ndarray  # (n, categorical fields) int64 rows
    multi: np.ndarray  # (n, max values) int64 rows of the multi-valued field, 0 = none
    numeric: np.ndarray  # (n, numeric fields) float32
    labels: np.ndarray | None = None  # (n,) float32

    def __len__(self) -> int:
        return len(self.categorical)

    def take(self, index) -> "EncodedRows":
        return EncodedRows(
            self.categorical[index],
            self.multi[index],
            self.numeric[index],
            None if self.labels is None else self.labels[index],
        )


@dataclass
class FieldMap:
    categorical: list[CategoricalField]
    numeric: list[NumericField]
    multi: CategoricalField | None = None
    max_multi: int = 1
    label: str | None = None
    stats: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        frame: pd.DataFrame,
        categorical: list[str],
        numeric: list[str],
        multi: str | None = None,
        label: str | None = None,
        min_count: int = 1,
        max_multi: int = 8,
    ) -> "FieldMap":
        missing = [
            c
            for c in [
                *categorical,
                *numeric,
                *([multi] if multi else []),
                *([label] if label else []),
            ]
            if c not in frame
        ]
        if missing:
            raise DataError(f"the table lacks column(s) {missing}")
        if min_count < 1:
            raise DataError("min_count must be at least 1")
        fields = []
        for name in categorical:
            counts = frame[name].astype("string").fillna("").value_counts(sort=True)
            kept = counts[(counts >= min_count) & (counts.index != "")]
            fields.append(CategoricalField(name, [str(v) for v in kept.index]))
        numbers = []
        for name in numeric:
            values = NumericField.compress(frame[name])
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
            std = float(np.nanstd(values)) if np.isfinite(values).any() else 1.0
            numbers.append(NumericField(name, mean, std if std > 0 else 1.0))
        multi_field = None
        if multi:
            exploded = (
                frame[multi].astype("string").fillna("").str.split(ATTRIBUTE_SEPARATOR).explode()
            )
            counts = exploded[exploded != ""].value_counts(sort=True)
            multi_field = CategoricalField(
                multi, [str(v) for v in counts[counts >= min_count].index]
            )
        stats = {"rows": int(len(frame)), "min_count": min_count}
        return cls(fields, numbers, multi_field, max_multi if multi else 1, label, stats)

    @property
    def field_sizes(self) -> tuple[int, ...]:
        return tuple(f.size for f in self.categorical)

    @property
    def multi_size(self) -> int:
        return self.multi.size if self.multi else 1

    def encode(self, frame: pd.DataFrame) -> EncodedRows:
        """Model inputs for `frame`'s rows (and labels when the map has a label column)."""
        categorical = (
            np.stack([f.rows(frame[f.name]) for f in self.categorical], 1)
            if self.categorical
            else np.zeros((len(frame), 0), np.int64)
        )
        numeric = (
            np.stack([f.encode(frame[f.name]) for f in self.numeric], 1)
            if self.numeric
            else np.zeros((len(frame), 0), np.float32)
        )
        multi = np.zeros((len(frame), self.max_multi), np.int64)
        if self.multi:
            lookup = {value: row for row, value in enumerate(self.multi.values, start=1)}
            for i, cell in enumerate(frame[self.multi.name].astype("string").fillna("")):
                rows = [lookup[v] for v in cell.split(ATTRIBUTE_SEPARATOR) if v in lookup][
                    : self.max_multi
                ]
                multi[i, : len(rows)] = rows
        labels = (
            frame[self.label].to_numpy(np.float32) if self.label and self.label in frame else None
        )
        return EncodedRows(categorical, multi, numeric, labels)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "FieldMap":
        raw = json.loads(text)
        return cls(
            [CategoricalField(**f) for f in raw["categorical"]],
            [NumericField(**f) for f in raw["numeric"]],
            CategoricalField(**raw["multi"]) if raw["multi"] else None,
            raw["max_multi"],
            raw["label"],
            raw["stats"],
        )
