"""A seeded synthetic catalog with planted multi-interest users.

Items belong to categories (the planted interests) and have power-law popularity within
them. Each user holds a few interests with Dirichlet weights; each interaction picks an
interest by weight and an item in it by popularity. Users also have a preferred hour, so
the context carries signal for the ranker. Same seed, same data.

Drift (off by default): at `drift_at` of the time span, a share `drift_users` of users
swap their heaviest interest for a category they did not hold, and `drift_items` new items
arrive, spread over the categories, each as popular as a random item of its category.
Every interaction after the shift is drawn again from the new interests and catalog (an
item a user already has is skipped); the data before it are those of the same
configuration without drift.
"""

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from service.data.schema import Dataset

_START = 1_700_000_000  # 2023-11-14, an arbitrary fixed origin keeps data reproducible
_SPAN = 90 * 86_400


@dataclass(frozen=True)
class SyntheticConfig:
    users: int = 2000
    items: int = 3000
    categories: int = 30
    interests_per_user: tuple[int, int] = (1, 4)
    interactions_per_user: tuple[int, int] = (20, 60)
    zipf_exponent: float = 1.1
    seed: int = 0
    drift_users: float = 0.0  # share of users whose heaviest interest changes at the shift
    drift_items: int = 0  # new items that arrive at the shift
    drift_at: float = 0.9  # when, as a share of the time span

    @property
    def drifts(self) -> bool:
        return self.drift_users > 0 or self.drift_items > 0

    @property
    def drift_time(self) -> int:
        """The shift's Unix time."""
        return _START + int(self.drift_at * _SPAN)

    def __post_init__(self) -> None:
        if min(self.users, self.items, self.categories) < 1:
            raise ValueError("users, items and categories must be at least 1")
        if self.items < self.categories:
            raise ValueError(
                f"items ({self.items}) must be at least categories ({self.categories})"
            )
        if not (0 <= self.drift_users <= 1 and 0 < self.drift_at < 1 and self.drift_items >= 0):
            raise ValueError("drift_users must be in [0, 1], drift_at in (0, 1), drift_items >= 0")


def generate(config: SyntheticConfig = SyntheticConfig()) -> Dataset:
    rng = np.random.default_rng(config.seed)
    item_category = rng.permutation(np.arange(config.items) % config.categories)  # none empty
    # Power-law popularity inside each category, by a random rank.
    rank = rng.permutation(config.items) + 1
    popularity = rank.astype(np.float64) ** -config.zipf_exponent
    members = [np.flatnonzero(item_category == c) for c in range(config.categories)]
    in_category_p = [popularity[m] / popularity[m].sum() for m in members]

    # Ids far apart in the uint64 range exercise collision-free 64-bit handling.
    user_ids = rng.choice(2**62, size=config.users, replace=False).astype(np.uint64) + 1
    item_ids = rng.choice(2**62, size=config.items, replace=False).astype(np.uint64) + 1

    users, items, stamps = [], [], []
    mixes = []  # each user's (interests, weights), for the drift
    lo_i, hi_i = config.interests_per_user
    lo_n, hi_n = config.interactions_per_user
    for u in range(config.users):
        n_interests = min(int(rng.integers(lo_i, hi_i + 1)), config.categories)
        interests = rng.choice(config.categories, size=n_interests, replace=False)
        weights = rng.dirichlet(np.ones(n_interests))
        mixes.append((interests, weights))
        n = int(rng.integers(lo_n, hi_n + 1))
        chosen_interest = rng.choice(interests, size=n, p=weights)
        picked: set[int] = set()
        hour = rng.integers(0, 24)
        times = np.sort(rng.integers(_START, _START + _SPAN, size=n))
        for c, t in zip(chosen_interest, times):
            item = int(rng.choice(members[c], p=in_category_p[c]))
            if item in picked:
                continue
            picked.add(item)
            users.append(u)
            items.append(item)
            # Most interactions fall near the user's preferred hour.
            jitter = int(rng.normal(0, 2))
            stamps.append(int(t) - int(t) % 86_400 + ((hour + jitter) % 24) * 3600)

    interactions = pd.DataFrame(
        {
            "user_id": user_ids[np.array(users)],
            "item_id": item_ids[np.array(items)],
            "timestamp": np.array(stamps, dtype=np.int64),
        }
    )
    catalog = pd.DataFrame({"item_id": item_ids, "category": [f"c{c}" for c in item_category]})
    if config.drifts:
        interactions, catalog = _drifted(
            config, interactions, catalog, mixes, user_ids, item_ids, item_category, popularity
        )
    drift_fields = ("drift_users", "drift_items", "drift_at")
    options = {
        k: v
        for k, v in asdict(config).items()
        if not isinstance(v, tuple) and (config.drifts or k not in drift_fields)
    }
    name = "synthetic:" + ",".join(f"{k}={v}" for k, v in options.items())
    return Dataset(name, interactions, catalog)


def _drifted(config, interactions, catalog, mixes, user_ids, item_ids, item_category, popularity):
    """The interactions after the shift drawn again (see the module's docstring), from a
    random stream of their own: the data before the shift stay as without drift."""
    rng = np.random.default_rng([config.seed, 1])
    new_ids = rng.choice(2**62, size=config.drift_items, replace=False).astype(np.uint64) + 1
    new_ids = np.setdiff1d(new_ids, item_ids)
    new_categories = rng.integers(0, config.categories, len(new_ids))
    all_ids = np.concatenate([item_ids, new_ids])
    all_categories = np.concatenate([item_category, new_categories])
    popularity = np.concatenate([popularity, np.zeros(len(new_ids))])
    members = [np.flatnonzero(all_categories == c) for c in range(config.categories)]
    for m in members:  # each new item as popular as a random one of its category
        old, new = m[m < config.items], m[m >= config.items]
        popularity[new] = rng.choice(popularity[old], len(new)) if len(old) else 1.0
    in_category_p = [popularity[m] / popularity[m].sum() for m in members]

    order = {int(user): u for u, user in enumerate(user_ids)}  # id -> generation index
    drifting = rng.random(config.users) < config.drift_users
    after = interactions["timestamp"].to_numpy() >= config.drift_time
    kept = interactions[~after]
    seen = {u: set(g) for u, g in kept.groupby("user_id")["item_id"]}
    rows = []
    for user, stamp in interactions.loc[after, ["user_id", "timestamp"]].itertuples(index=False):
        u = order[int(user)]
        interests, weights = mixes[u]
        if drifting[u]:
            others = np.setdiff1d(np.arange(config.categories), interests)
            if len(others):
                interests = interests.copy()
                interests[np.argmax(weights)] = others[u % len(others)]
        c = rng.choice(interests, p=weights)
        item = all_ids[rng.choice(members[c], p=in_category_p[c])]
        if item in seen.setdefault(user, set()):
            continue
        seen[user].add(item)
        rows.append((user, item, stamp))
    redrawn = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype(
        {"user_id": np.uint64, "item_id": np.uint64, "timestamp": np.int64}
    )
    interactions = (
        pd.concat([kept, redrawn])
        .sort_values(["user_id", "timestamp"], kind="stable")
        .reset_index(drop=True)
    )
    arrived = pd.DataFrame({"item_id": new_ids, "category": [f"c{c}" for c in new_categories]})
    return interactions, pd.concat([catalog, arrived], ignore_index=True)


def clustered_unit_vectors(n: int, dim: int = 64, centres: int = 1000, seed: int = 0) -> np.ndarray:
    """`n` unit vectors drawn around `centres` random directions, like trained item vectors:
    the catalogs of the index benchmarks."""
    return unit_vectors_around_centres(n, dim, centres, seed)[0]


def unit_vectors_around_centres(
    n: int, dim: int = 64, centres: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`clustered_unit_vectors` and each one's centre (0 .. centres - 1)."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    drawn = np.empty(n, dtype=np.int64)
    for start in range(0, n, 200_000):  # in slices: 1M x 64 floats of noise is 2 GiB of float64
        m = min(200_000, n - start)
        drawn[start : start + m] = rng.integers(0, centres, m)
        v = middle[drawn[start : start + m]] + 0.6 * rng.normal(size=(m, dim)).astype(np.float32)
        out[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out, drawn
