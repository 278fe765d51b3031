"""The embedding-store interface every backend implements.

Keys are raw unsigned 64-bit ids: no id is hashed into a shared row, so two ids never
share a vector. A lookup of an id the table does not hold returns the table's default
vector and says so in `Lookup.found`.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TableConfig:
    name: str
    dim: int
    default: np.ndarray | None = field(default=None, compare=False)

    def default_vector(self) -> np.ndarray:
        if self.default is None:
            return np.zeros(self.dim, dtype=np.float32)
        return np.asarray(self.default, dtype=np.float32).reshape(self.dim)


@dataclass
class Lookup:
    vectors: np.ndarray  # (n, dim) float32, default rows where not found
    found: np.ndarray  # (n,) bool


def as_ids(ids) -> np.ndarray:
    """Ids as a 1-d uint64 array; refuses negatives and values past 2**64 - 1."""
    if isinstance(ids, np.ndarray) and ids.dtype == np.uint64:
        return ids.reshape(-1)
    values = list(ids) if not isinstance(ids, np.ndarray) else ids.tolist()
    for value in values:
        if not 0 <= int(value) < 2**64:
            raise ValueError(f"id {value} is outside the unsigned 64-bit range")
    return np.array(values, dtype=np.uint64).reshape(-1)


class EmbeddingStore(ABC):
    def __init__(self, tables: list[TableConfig]):
        self.tables = {t.name: t for t in tables}

    def table(self, name: str) -> TableConfig:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"no embedding table {name!r}; tables: {sorted(self.tables)}") from None

    @abstractmethod
    def get_many(self, table: str, ids) -> Lookup: ...

    @abstractmethod
    def put_many(self, table: str, ids, vectors: np.ndarray) -> None: ...

    @abstractmethod
    def delete(self, table: str, ids) -> int:
        """Remove ids; returns how many were present."""

    @abstractmethod
    def size(self, table: str) -> int: ...

    @abstractmethod
    def scan(self, table: str, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, vectors) the table holds, in batches."""

    def _check_vectors(self, table: str, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        config = self.table(table)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), config.dim):
            raise ValueError(
                f"table {table!r} takes ({len(ids)}, {config.dim}) vectors, got {vectors.shape}"
            )
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or Inf")
        return vectors
