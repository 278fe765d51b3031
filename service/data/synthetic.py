"""A seeded synthetic catalog with planted multi-interest users.

Items belong to categories (the planted interests) and have power-law popularity within
them. Each user holds a few interests with Dirichlet weights; each interaction picks an
interest by weight and an item in it by popularity. Users also have a preferred hour, so
the context carries signal for the ranker. Same seed, same data.
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

    def __post_init__(self) -> None:
        if min(self.users, self.items, self.categories) < 1:
            raise ValueError("users, items and categories must be at least 1")
        if self.items < self.categories:
            raise ValueError(
                f"items ({self.items}) must be at least categories ({self.categories})"
            )


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
    lo_i, hi_i = config.interests_per_user
    lo_n, hi_n = config.interactions_per_user
    for u in range(config.users):
        n_interests = min(int(rng.integers(lo_i, hi_i + 1)), config.categories)
        interests = rng.choice(config.categories, size=n_interests, replace=False)
        weights = rng.dirichlet(np.ones(n_interests))
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
    options = {k: v for k, v in asdict(config).items() if not isinstance(v, tuple)}
    name = "synthetic:" + ",".join(f"{k}={v}" for k, v in options.items())
    return Dataset(name, interactions, catalog)


def clustered_unit_vectors(n: int, dim: int = 64, centres: int = 1000, seed: int = 0) -> np.ndarray:
    """`n` unit vectors drawn around `centres` random directions, like trained item vectors:
    the catalogs of the index benchmarks."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(
        0, n, 200_000
    ):  # in slices: 1M x 64 floats of noise at once is 2 GiB of float64
        m = min(200_000, n - start)
        v = middle[rng.integers(0, centres, m)] + 0.6 * rng.normal(size=(m, dim)).astype(np.float32)
        out[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out
