"""In-process embedding store: the embedded default and the test double for the others."""

import threading
from collections.abc import Iterator

import numpy as np

from service.embeddings.store import EmbeddingStore, Lookup, TableConfig, as_ids


class InMemoryEmbeddingStore(EmbeddingStore):
    def __init__(self, tables: list[TableConfig]):
        super().__init__(tables)
        self._rows: dict[str, dict[int, np.ndarray]] = {t.name: {} for t in tables}
        self._lock = threading.Lock()

    def get_many(self, table: str, ids) -> Lookup:
        config = self.table(table)
        keys = as_ids(ids).tolist()
        rows = self._rows[table]
        vectors = np.empty((len(keys), config.dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        default = config.default_vector()
        with self._lock:
            for i, key in enumerate(keys):
                row = rows.get(key)
                if row is None:
                    vectors[i] = default
                else:
                    vectors[i] = row
                    found[i] = True
        return Lookup(vectors, found)

    def put_many(self, table: str, ids, vectors: np.ndarray) -> None:
        keys = as_ids(ids)
        vectors = self._check_vectors(table, keys, vectors)
        rows = self._rows[table]
        with self._lock:
            for key, vector in zip(keys.tolist(), vectors):
                rows[key] = vector.copy()

    def delete(self, table: str, ids) -> int:
        self.table(table)
        rows = self._rows[table]
        with self._lock:
            return sum(rows.pop(key, None) is not None for key in as_ids(ids).tolist())

    def size(self, table: str) -> int:
        self.table(table)
        return len(self._rows[table])

    def scan(self, table: str, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        config = self.table(table)
        with self._lock:
            items = list(self._rows[table].items())
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            ids = np.array([k for k, _ in chunk], dtype=np.uint64)
            vectors = np.stack([v for _, v in chunk]) if chunk else np.empty((0, config.dim))
            yield ids, vectors.astype(np.float32)
