"""Similar items (a product page's "more like this"): the items whose vectors are nearest
to an item's, by the same index and item tower that retrieval uses.

An item's vector is the item tower's output for its row in the item table and its catalog
attributes, as the index holds it (online updates re-embed the same way), so an item the
online trainer just learned is answered for too. An item neither the catalog nor the table
holds has no vector: `UnknownItem`.
"""

import numpy as np
import torch

from service.embeddings.store import EmbeddingStore
from service.embeddings.tables import ITEM_TABLE
from service.retrieval.candidates import is_in_sorted
from service.retrieval.catalog import AllowedItems, ItemCatalog
from service.retrieval.index import ItemIndex
from service.retrieval.two_tower import TwoTower
from service.schemas import UnknownItem


def item_vector(
    two_tower: TwoTower, catalog: ItemCatalog, store: EmbeddingStore, item_id: int
) -> tuple[np.ndarray, bool]:
    """(the item's vector [1, d], whether the table read failed: then its id part is the
    table's default). Raises `UnknownItem` for an item with no vector: neither the catalog
    nor the table holds it."""
    ids = np.array([item_id], dtype=np.uint64)
    lookup = store.get_many(ITEM_TABLE, ids)
    if not catalog.holds(ids)[0] and not lookup.found[0]:
        if lookup.degraded:
            raise ConnectionError("embedding table unavailable")
        raise UnknownItem(f"item {item_id} is not in the catalog and has no vector yet")
    with torch.inference_mode():
        vector = two_tower.item_tower_from_vectors(
            torch.from_numpy(lookup.vectors), torch.from_numpy(catalog.attribute_rows(ids))
        )
    return vector.numpy(), lookup.degraded


def nearest_items(
    index: ItemIndex,
    vector: np.ndarray,
    item_id: int,
    k: int,
    allowed: AllowedItems | None = None,
    blocked: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cosine scores) of the `k` items nearest to `vector`, `item_id` and `blocked`
    (sorted) left out, only `allowed` items if given."""
    scores, ids = index.search(vector, k + 1, allowed)
    scores, ids = scores[0], ids[0]
    keep = np.isfinite(scores) & (ids != np.uint64(item_id))
    if blocked is not None and len(blocked):
        keep &= ~is_in_sorted(ids, blocked)
    return ids[keep][:k], scores[keep][:k].astype(np.float32)
