"""The item catalog a serving process answers from: each item's attributes, which items
are hidden or deleted, and the filters compiled over it.

The artifact's catalog is the feature space's: its items and their "column=value"
attributes, each value with the item rows that hold it. At run time the catalog API
(`service.api.admin`) upserts items with attributes (new ones, or new attributes for known
ones), hides and unhides items (out of stock, banned) and deletes them; every serving
process applies those changes from one feed (`service.online.catalog_sync`). A hidden or
deleted item is never answered; a deleted one also loses its attributes until it is
upserted again.

A request's filter compiles to a boolean mask over the artifact's items (`in`: one of the
values; `not_in`: none of them; the terms ANDed), corrected for the items upserted since,
less the hidden and deleted ones: `AllowedItems`, the sorted ids it keeps, which the index
searches inside (`service.retrieval.index`) and the other sources select from. Items
without catalog attributes (ids the online trainer admitted from events) meet no filter.

Compiled filters are kept in a small cache, bounded in bytes, with what the index derives
from each (its ID selector, the kept items' vectors): a shop's filters recur, and
compiling one over a million items costs milliseconds. A catalog change empties the
cache. Numpy only: the gateway keeps a catalog too, for its fallback answers.
"""

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from service.data.feature_space import MAX_ATTRIBUTES_PER_ITEM, FeatureSpace, IdVocabulary
from service.retrieval.candidates import is_in_sorted
from service.schemas import AttributeCondition, InvalidFilter

DEFAULT_CACHE_BYTES = 256 << 20
EMPTY_IDS = np.empty(0, np.uint64)
Attributes = Mapping[str, Iterable[str]]  # column -> values


@dataclass(eq=False)
class AllowedItems:
    """The catalog items a filter keeps: sorted, distinct uint64 ids, and their share of
    the catalog. `derived` holds what an index computed from them, for the next search
    with the same filter; `derived_bytes` counts its memory toward the cache's bound."""

    ids: np.ndarray
    share: float
    derived: dict = field(default_factory=dict)
    derived_bytes: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.derived_bytes

    def keeps(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` the filter keeps."""
        return is_in_sorted(np.asarray(ids, dtype=np.uint64), self.ids)


FilterKey = tuple


def filter_key(conditions: dict[str, AttributeCondition]) -> FilterKey:
    """The same filter, however its terms and values are ordered, has one key."""
    return tuple(
        sorted(
            (
                column,
                tuple(sorted(set(condition.in_))) if condition.in_ is not None else None,
                tuple(sorted(set(condition.not_in))) if condition.not_in is not None else None,
            )
            for column, condition in conditions.items()
        )
    )


def meets(attributes: dict[str, frozenset[str]], key: FilterKey) -> bool:
    """Whether an item with `attributes` meets the filter `key` (an upserted item's test)."""
    for column, within, without in key:
        held = attributes.get(column, frozenset())
        if within is not None and held.isdisjoint(within):
            return False
        if without is not None and not held.isdisjoint(without):
            return False
    return True


def sorted_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.union1d(a, np.asarray(b, dtype=np.uint64)).astype(np.uint64)


@dataclass(frozen=True)
class CatalogChanges:
    """What changed since the artifact, as one value: upserted items' attributes (which
    replace the artifact's for an item it has), the hidden and the deleted items."""

    upserted: dict = field(default_factory=dict)  # item id -> column -> frozenset of values
    upserted_ids: np.ndarray = field(default_factory=lambda: EMPTY_IDS)  # sorted
    hidden: np.ndarray = field(default_factory=lambda: EMPTY_IDS)
    deleted: np.ndarray = field(default_factory=lambda: EMPTY_IDS)
    blocked: np.ndarray = field(default_factory=lambda: EMPTY_IDS)  # hidden or deleted
    columns: frozenset = frozenset()  # the attributes upserted items hold

    @classmethod
    def of(cls, upserted: dict, hidden: np.ndarray, deleted: np.ndarray) -> "CatalogChanges":
        hidden = np.asarray(hidden, np.uint64)
        deleted = np.asarray(deleted, np.uint64)
        return cls(
            upserted,
            np.array(sorted(upserted), dtype=np.uint64),
            hidden,
            deleted,
            np.union1d(hidden, deleted).astype(np.uint64),
            frozenset(c for held in upserted.values() for c in held),
        )


class ItemCatalog:
    """The catalog's items and attributes, the items hidden or deleted since, and the
    filters compiled over them. Thread-safe: changes come from the catalog feed's reader
    while requests compile filters."""

    def __init__(
        self,
        item_ids: np.ndarray,
        item_attributes: np.ndarray,
        attribute_values: list[str],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        """`item_ids`: the artifact's catalog, sorted; `item_attributes`: (len + 1, slots)
        1-based value numbers per item row, row 0 the unknown item, 0 padding
        (`FeatureSpace`); `attribute_values`: "column=value" per value number - 1."""
        self.item_ids = np.asarray(item_ids, dtype=np.uint64)
        self._vocabulary = IdVocabulary(self.item_ids)  # id -> row of `item_attributes`
        self.item_attributes = item_attributes
        self.numbers: dict[str, dict[str, int]] = {}  # column -> value -> value number
        self._named = [("", "")]  # value number -> (column, value)
        for number, name in enumerate(attribute_values, start=1):
            column, _, value = name.partition("=")
            self.numbers.setdefault(column, {})[value] = number
            self._named.append((column, value))
        rows, slots = np.nonzero(item_attributes[1:])
        numbers = item_attributes[1:][rows, slots]
        order = np.argsort(numbers, kind="stable")
        self._rows = rows[order]  # item positions, grouped by value number
        self._starts = np.searchsorted(numbers[order], np.arange(len(attribute_values) + 2))
        self._state = CatalogChanges()
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[FilterKey, AllowedItems] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_features(cls, features: FeatureSpace, cache_bytes: int = DEFAULT_CACHE_BYTES):
        return cls(
            features.items.ids, features.item_attributes, features.attribute_values, cache_bytes
        )

    @property
    def columns(self) -> list[str]:
        return sorted(set(self.numbers) | self._state.columns)

    @property
    def hidden(self) -> np.ndarray:
        return self._state.hidden

    @property
    def deleted(self) -> np.ndarray:
        return self._state.deleted

    @property
    def blocked(self) -> np.ndarray:
        """Hidden or deleted, sorted: never answered."""
        return self._state.blocked

    @property
    def upserted_ids(self) -> np.ndarray:
        return self._state.upserted_ids

    # Changes: each replaces the state whole (a request reads one state throughout) and
    # empties the filter cache, so no filter outlives what it was compiled on.

    def upsert(self, item_ids: np.ndarray, attributes: list[Attributes]) -> None:
        """Items with these attributes (replacing what the catalog held for them); an item
        deleted before is back, a hidden one stays hidden."""
        with self._lock:
            state = self._state
            upserted = dict(state.upserted)
            for item_id, held in zip(np.asarray(item_ids, np.uint64).tolist(), attributes):
                upserted[item_id] = {c: frozenset(v) for c, v in held.items() if v}
            self._changed(upserted, state.hidden, np.setdiff1d(state.deleted, item_ids))

    def hide(self, item_ids: np.ndarray) -> None:
        with self._lock:
            state = self._state
            self._changed(state.upserted, sorted_union(state.hidden, item_ids), state.deleted)

    def unhide(self, item_ids: np.ndarray) -> None:
        with self._lock:
            state = self._state
            self._changed(state.upserted, np.setdiff1d(state.hidden, item_ids), state.deleted)

    def delete(self, item_ids: np.ndarray) -> None:
        """Never answered, and no attributes, until upserted again."""
        with self._lock:
            state = self._state
            gone = set(np.asarray(item_ids, np.uint64).tolist())
            upserted = {i: held for i, held in state.upserted.items() if i not in gone}
            self._changed(upserted, state.hidden, sorted_union(state.deleted, item_ids))

    def _changed(self, upserted: dict, hidden: np.ndarray, deleted: np.ndarray) -> None:
        self._state = CatalogChanges.of(upserted, hidden, deleted)
        self._cache.clear()

    def holds(self, item_ids: np.ndarray) -> np.ndarray:
        """Which of `item_ids` the catalog has (the artifact's or upserted, not deleted)."""
        state, ids = self._state, np.asarray(item_ids, dtype=np.uint64)
        held = is_in_sorted(ids, self.item_ids) | is_in_sorted(ids, state.upserted_ids)
        return held & ~is_in_sorted(ids, state.deleted)

    def attribute_rows(self, item_ids: np.ndarray) -> np.ndarray:
        """(n, MAX_ATTRIBUTES_PER_ITEM) value numbers per item, 0-padded, as the models'
        attribute embeddings take them: an upserted item's values the artifact knows (a
        value it never saw has no embedding and is left out), else the artifact's."""
        state, ids = self._state, np.asarray(item_ids, dtype=np.uint64)
        rows = self.item_attributes[self._vocabulary.rows(ids)]  # fancy indexing: a copy
        rows[is_in_sorted(ids, state.deleted)] = 0
        for position, item_id in enumerate(ids.tolist()):
            held = state.upserted.get(item_id)
            if held is None:
                continue
            numbers = [
                self.numbers[c][v]
                for c, values in sorted(held.items())
                for v in sorted(values)
                if v in self.numbers.get(c, {})
            ][:MAX_ATTRIBUTES_PER_ITEM]
            rows[position] = 0
            rows[position, : len(numbers)] = numbers
        return rows

    def values_of(self, item_ids: np.ndarray, column: str) -> list[frozenset[str]]:
        """Each item's values of `column` (empty for an item without it), upserted ones as
        upserted, new values included."""
        state, ids = self._state, np.asarray(item_ids, dtype=np.uint64)
        rows = self.item_attributes[self._vocabulary.rows(ids)]
        deleted = is_in_sorted(ids, state.deleted)
        out = []
        for item_id, row, gone in zip(ids.tolist(), rows, deleted):
            held = state.upserted.get(item_id)
            if held is not None:
                out.append(held.get(column, frozenset()))
            elif gone:
                out.append(frozenset())
            else:
                named = (self._named[n] for n in row[row > 0])
                out.append(frozenset(value for c, value in named if c == column))
        return out

    # Filters

    def _holding(self, column: str, values: tuple[str, ...]) -> np.ndarray:
        """A mask over the artifact's items: those whose `column` holds one of `values`."""
        mask = np.zeros(len(self.item_ids), dtype=bool)
        numbers = self.numbers.get(column, {})
        for value in values:
            number = numbers.get(value)  # a value no item has: no item
            if number is not None:
                mask[self._rows[self._starts[number] : self._starts[number + 1]]] = True
        return mask

    def _compile(self, key: FilterKey, state: "CatalogChanges") -> AllowedItems:
        mask = np.ones(len(self.item_ids), dtype=bool)
        for column, within, without in key:
            if within is not None:
                mask &= self._holding(column, within)
            if without is not None:
                mask &= ~self._holding(column, without)
        ids = self.item_ids[mask]
        if state.upserted:  # their attributes now are what counts
            ids = ids[~is_in_sorted(ids, state.upserted_ids)]
            met = [i for i, held in state.upserted.items() if meets(held, key)]
            ids = sorted_union(ids, np.array(met, dtype=np.uint64))
        ids = ids[~is_in_sorted(ids, state.blocked)]
        size = len(self.item_ids) + int((~is_in_sorted(state.upserted_ids, self.item_ids)).sum())
        return AllowedItems(ids, len(ids) / size if size else 0.0)

    def allowed(self, conditions: dict[str, AttributeCondition] | None) -> AllowedItems | None:
        """What `conditions` keep (None: no filter); `InvalidFilter` for an attribute the
        catalog does not have."""
        if not conditions:
            return None
        columns = self.columns
        unknown = sorted(set(conditions) - set(columns))
        if unknown:
            raise InvalidFilter(
                f"the catalog has no attribute {', '.join(map(repr, unknown))}; "
                f"it has {columns or 'none'}"
            )
        key = filter_key(conditions)
        with self._lock:
            allowed, state = self._cache.get(key), self._state
            if allowed is not None:
                self._cache.move_to_end(key)
                return allowed
        allowed = self._compile(key, state)  # outside the lock: it takes milliseconds
        with self._lock:
            if self._state is not state:  # the catalog changed meanwhile: not kept
                return allowed
            allowed = self._cache.setdefault(key, allowed)  # another thread may have won
            self._cache.move_to_end(key)
            while len(self._cache) > 1 and self.cached_bytes > self.cache_bytes:
                self._cache.popitem(last=False)
        return allowed

    @property
    def cached_bytes(self) -> int:
        return sum(allowed.nbytes for allowed in self._cache.values())
