"""The artifact's most popular items: candidates for a user the service knows nothing about,
the fill of a small catalogue, and the gateway's fallback when retrieval cannot answer.
Numpy and safetensors only, so a gateway loads it without torch or FAISS."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays

from service.retrieval.candidates import SOURCE_POPULAR, Candidates, is_in_sorted, labels
from service.retrieval.catalog import AllowedItems

POPULAR_FILE = "popular.safetensors"


def version_namespace(version: str) -> str:
    """A short name for a version's tables in a shared store: its random token."""
    return version.rsplit("-", 1)[-1]


@dataclass
class PopularItems:
    """Items by training popularity with their retrieval-scale scores (cosine with the
    vector of a user the model knows nothing about), and the version they come from."""

    version: str
    items: np.ndarray  # uint64, most popular first
    scores: np.ndarray  # float32

    @classmethod
    def from_folder(cls, folder: Path, version: str) -> "PopularItems":
        """From a version folder whose manifest was already checked (`read_manifest`)."""
        popular = load_arrays(folder / POPULAR_FILE)
        return cls(version, popular["items"], popular["scores"])

    def save(self, folder: Path) -> None:
        save_arrays({"items": self.items, "scores": self.scores}, folder / POPULAR_FILE)

    @property
    def namespace(self) -> str:
        return version_namespace(self.version)

    def top(self, n: int, excluded: np.ndarray, allowed: AllowedItems | None = None) -> Candidates:
        """The `n` most popular items not in `excluded` (sorted, distinct), only `allowed`
        items if given."""
        keep = ~is_in_sorted(self.items, excluded)
        if allowed is not None:
            keep &= allowed.keeps(self.items)
        ids = self.items[keep][:n]
        return Candidates(ids, self.scores[keep][:n], labels(SOURCE_POPULAR, len(ids)))
