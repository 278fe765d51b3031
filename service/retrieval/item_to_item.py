"""Item-to-item candidates: the items that co-occur most with the user's latest items.

At train time each item keeps its `neighbours` most similar items by cosine-normalised
co-occurrence (users who interacted with both, over the square root of each one's user
count: item-kNN, Sarwar et al. 2001; Linden et al. 2003). A request sums the similarities
of the neighbours of the user's latest items and takes the best it has not seen. It
answers where co-occurrence says more than the learned vectors: sparse catalogues, items
bought together. Numpy only when serving; scipy's sparse products build it.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from tqdm import tqdm

from service.retrieval.candidates import SOURCE_ITEM_TO_ITEM, Candidates, is_in_sorted, labels
from service.retrieval.catalog import AllowedItems

log = logging.getLogger(__name__)

NEIGHBOURS_FILE = "item_neighbours.safetensors"
PAIRS_PER_USER = 200  # a user's latest items that count towards co-occurrence: bounds the pairs


@dataclass
class ItemNeighbours:
    item_ids: np.ndarray  # uint64, sorted: the catalogue
    neighbours: np.ndarray  # int32 [items, M]: positions in item_ids, most similar first; -1 none
    similarity: np.ndarray  # float32 [items, M]

    @classmethod
    def build(
        cls, interactions: pd.DataFrame, item_ids: np.ndarray, neighbours: int = 50
    ) -> "ItemNeighbours":
        """From interactions sorted by user, time; `item_ids` sorted, holding every item."""
        from scipy import sparse  # training only: serving processes start without scipy

        latest = interactions.groupby("user_id", sort=False).tail(PAIRS_PER_USER)
        users = pd.factorize(latest["user_id"])[0]
        items = np.searchsorted(item_ids, latest["item_id"].to_numpy(np.uint64))
        seen = sparse.csr_matrix(
            (np.ones(len(items), np.float32), (users, items)),
            shape=(users.max(initial=-1) + 1, len(item_ids)),
        )
        seen.data[:] = 1.0  # repeats count once
        together = (seen.T @ seen).tocsr()
        norm = 1.0 / np.sqrt(np.maximum(together.diagonal(), 1.0))
        together = sparse.diags(norm) @ together @ sparse.diags(norm)
        together.setdiag(0.0)
        together = together.tocsr()
        together.eliminate_zeros()
        top = np.full((len(item_ids), neighbours), -1, np.int32)
        similarity = np.zeros((len(item_ids), neighbours), np.float32)
        for row in tqdm(range(len(item_ids)), desc="item neighbours", unit="item", mininterval=2):
            start, end = together.indptr[row], together.indptr[row + 1]
            if start == end:
                continue
            values, columns = together.data[start:end], together.indices[start:end]
            # Most similar first; equal similarity by position, so builds are reproducible.
            best = np.lexsort((columns, -values))[:neighbours]
            top[row, : len(best)] = columns[best]
            similarity[row, : len(best)] = values[best]
        log.info("item neighbours: %d items, up to %d each", len(item_ids), neighbours)
        return cls(item_ids, top, similarity)

    @classmethod
    def from_folder(cls, folder: Path) -> "ItemNeighbours | None":
        """From a version folder whose manifest was checked; None for artifacts without one."""
        if not (folder / NEIGHBOURS_FILE).is_file():
            return None
        arrays = load_arrays(folder / NEIGHBOURS_FILE)
        return cls(arrays["item_ids"], arrays["neighbours"], arrays["similarity"])

    def save(self, folder: Path) -> None:
        save_arrays(
            {
                "item_ids": self.item_ids,
                "neighbours": self.neighbours,
                "similarity": self.similarity,
            },
            folder / NEIGHBOURS_FILE,
        )

    def top(
        self,
        history: np.ndarray,
        n: int,
        excluded: np.ndarray,
        allowed: AllowedItems | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `n` items most similar to `history` (ids, summed similarity; best first) not
        in `excluded` (sorted, distinct), only `allowed` ones if given. Items the catalogue
        lacks add nothing."""
        at = np.minimum(np.searchsorted(self.item_ids, history), len(self.item_ids) - 1)
        rows = at[self.item_ids[at] == history]
        found = self.neighbours[rows].ravel()
        weights = self.similarity[rows].ravel()
        keep = found >= 0
        positions, which = np.unique(found[keep], return_inverse=True)
        totals = np.bincount(which, weights[keep], minlength=len(positions))
        ids = self.item_ids[positions]
        keep = ~is_in_sorted(ids, excluded)
        if allowed is not None:
            keep &= allowed.keeps(ids)
        ids, totals = ids[keep], totals[keep]
        best = np.lexsort((ids, -totals))[:n]
        return ids[best], totals[best].astype(np.float32)


def interleaved(primary: Candidates, secondary: Candidates, share: float, n: int) -> Candidates:
    """Two ranked lists merged into `n`: the secondary takes `share` of the places, spread
    evenly down the list (its j-th item at place (j + 1) / share, the primary's i-th at
    (i + 1) / (1 - share)), a candidate found by both kept where it comes first."""
    if share <= 0.0 or not len(secondary):
        return primary.take(np.arange(min(n, len(primary))))
    both = primary.extended(secondary)
    places = np.concatenate(
        [
            (np.arange(len(primary)) + 1) / max(1.0 - share, 1e-9),
            (np.arange(len(secondary)) + 1) / share,
        ]
    )
    order = np.argsort(places, kind="stable")
    _, first = np.unique(both.item_ids[order], return_index=True)
    return both.take(order[np.sort(first)][:n])


def item_to_item_candidates(ids: np.ndarray, scores: np.ndarray) -> Candidates:
    return Candidates(ids, scores.astype(np.float32), labels(SOURCE_ITEM_TO_ITEM, len(ids)))
