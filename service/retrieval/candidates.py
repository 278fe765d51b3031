"""What candidate generation answers: the candidates as columns (ids, scores, sources,
kNN-Embed components), the source and strategy names, and the id-set helpers requests use.
Numpy only, so the gateway reads and writes candidates without loading a model."""

from dataclasses import dataclass

import numpy as np

SOURCE_TWO_TOWER, SOURCE_KNN_EMBED, SOURCE_POPULAR = "two_tower", "knn_embed", "popular"
SOURCE_ITEM_TO_ITEM = "item_to_item"
STRATEGY_TWO_TOWER, STRATEGY_KNN_EMBED = "two_tower", "knn_embed"


def labels(value, n: int) -> np.ndarray:
    """`n` copies of a per-candidate label, as an object array (fancy-indexed with the ids)."""
    out = np.empty(n, dtype=object)
    out[:] = value
    return out


def is_in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which `values` (any shape) are in the sorted, distinct `sorted_set`: a binary search,
    cheaper than `np.isin`'s sort of both sides for a request's few hundred ids."""
    if not len(sorted_set):
        return np.zeros(values.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


@dataclass
class Candidates:
    item_ids: np.ndarray  # uint64
    scores: np.ndarray  # float32 cosine: with the user vector, or the cold-user vector for popular
    sources: np.ndarray  # object: each candidate's source name
    degraded: bool = False  # the embedding store failed: vectors were defaults
    components: np.ndarray | None = None  # object: kNN-Embed's cluster of each candidate, else None
    vectors: np.ndarray | None = None  # (n, d) item vectors, when diversity needs them

    def __post_init__(self) -> None:
        if self.components is None:
            self.components = labels(None, len(self.item_ids))

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.empty(0, np.uint64), np.empty(0, np.float32), labels(None, 0))

    def __len__(self) -> int:
        return len(self.item_ids)

    def ranked(self) -> "Candidates":
        """Best score first, whatever found it (ties keep their order)."""
        return self.take(np.argsort(-self.scores, kind="stable"))

    def take(self, index: np.ndarray) -> "Candidates":
        return Candidates(
            self.item_ids[index],
            self.scores[index],
            self.sources[index],
            self.degraded,
            self.components[index],
        )

    def extended(self, more: "Candidates") -> "Candidates":
        return Candidates(
            np.concatenate([self.item_ids, more.item_ids]),
            np.concatenate([self.scores, more.scores]).astype(np.float32),
            np.concatenate([self.sources, more.sources]),
            self.degraded or more.degraded,
            np.concatenate([self.components, more.components]),
        )
