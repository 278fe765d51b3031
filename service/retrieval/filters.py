"""Item filters: which catalog items a request's `filter` keeps.

The catalog's attributes are the feature space's "column=value" values, each with the item
rows that hold it. A filter compiles to a boolean mask over the catalog's items (`in`: one
of the values; `not_in`: none of them; the terms ANDed), and that to the sorted ids it
keeps: `AllowedItems`, which the index searches inside (`service.retrieval.index`) and the
other sources (item-to-item, popular) select from. Items outside the catalog (ids the
online trainer admitted from events) have no attributes and meet no filter.

Compiled filters are kept in a small cache, bounded in bytes, with what the index derives
from each (its ID selector, the kept items' vectors): a shop's filters recur (its
categories, its brands), and compiling one over a million items costs milliseconds. Numpy
only: the gateway compiles filters too, for its fallback answers.
"""

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from service.data.feature_space import FeatureSpace
from service.retrieval.candidates import is_in_sorted
from service.schemas import AttributeCondition, InvalidFilter

DEFAULT_CACHE_BYTES = 256 << 20


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


class ItemAttributes:
    """The catalog's attribute values and, per value, the items that hold it."""

    def __init__(
        self,
        item_ids: np.ndarray,
        item_attributes: np.ndarray,
        attribute_values: list[str],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        """`item_ids`: the catalog, sorted; `item_attributes`: (len + 1, slots) 1-based value
        numbers per item row, row 0 the unknown item, 0 padding (`FeatureSpace`)."""
        self.item_ids = np.asarray(item_ids, dtype=np.uint64)
        self.values: dict[str, dict[str, int]] = {}  # column -> value -> value number
        for number, name in enumerate(attribute_values, start=1):
            column, _, value = name.partition("=")
            self.values.setdefault(column, {})[value] = number
        rows, slots = np.nonzero(item_attributes[1:])
        numbers = item_attributes[1:][rows, slots]
        order = np.argsort(numbers, kind="stable")
        self._rows = rows[order]  # item positions, grouped by value number
        self._starts = np.searchsorted(numbers[order], np.arange(len(attribute_values) + 2))
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
        return sorted(self.values)

    def _holding(self, column: str, values: tuple[str, ...]) -> np.ndarray:
        """A mask over the catalog: the items whose `column` holds one of `values`."""
        mask = np.zeros(len(self.item_ids), dtype=bool)
        numbers = self.values[column]
        for value in values:
            number = numbers.get(value)  # a value no item has: no item
            if number is not None:
                mask[self._rows[self._starts[number] : self._starts[number + 1]]] = True
        return mask

    def _compile(self, key: FilterKey) -> AllowedItems:
        mask = np.ones(len(self.item_ids), dtype=bool)
        for column, within, without in key:
            if within is not None:
                mask &= self._holding(column, within)
            if without is not None:
                mask &= ~self._holding(column, without)
        return AllowedItems(self.item_ids[mask], float(mask.mean()) if len(mask) else 0.0)

    def allowed(self, conditions: dict[str, AttributeCondition] | None) -> AllowedItems | None:
        """What `conditions` keep (None: no filter); `InvalidFilter` for an attribute the
        catalog does not have."""
        if not conditions:
            return None
        unknown = sorted(set(conditions) - set(self.values))
        if unknown:
            raise InvalidFilter(
                f"the catalog has no attribute {', '.join(map(repr, unknown))}; "
                f"it has {self.columns or 'none'}"
            )
        key = filter_key(conditions)
        with self._lock:
            allowed = self._cache.get(key)
            if allowed is not None:
                self._cache.move_to_end(key)
                return allowed
        allowed = self._compile(key)
        with self._lock:
            allowed = self._cache.setdefault(key, allowed)  # another thread may have won
            self._cache.move_to_end(key)
            while len(self._cache) > 1 and self.cached_bytes > self.cache_bytes:
                self._cache.popitem(last=False)
        return allowed

    @property
    def cached_bytes(self) -> int:
        return sum(allowed.nbytes for allowed in self._cache.values())
