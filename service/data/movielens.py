"""GroupLens MovieLens-100K (u.data, u.item) in the generic format."""

from pathlib import Path

import pandas as pd

from service.data.schema import DataError, Dataset

_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def load_movielens_100k(path: str | Path) -> Dataset:
    root = Path(path)
    ratings_file, items_file = root / "u.data", root / "u.item"
    if not ratings_file.is_file():
        raise DataError(f"{ratings_file} not found: point at the ml-100k folder")
    ratings = pd.read_csv(
        ratings_file, sep="\t", names=["user_id", "item_id", "rating", "timestamp"]
    )
    interactions = ratings[["user_id", "item_id", "timestamp"]].assign(
        weight=ratings["rating"].astype("float32")
    )
    items = pd.DataFrame({"item_id": []})
    if items_file.is_file():
        raw = pd.read_csv(
            items_file,
            sep="|",
            encoding="latin-1",
            header=None,
            names=["item_id", "title", "release", "video_release", "url", *_GENRES],
        )
        genre_flags = raw[list(_GENRES)].to_numpy(bool)
        genres = ["|".join(g for g, on in zip(_GENRES, row) if on) for row in genre_flags]
        items = pd.DataFrame({"item_id": raw["item_id"], "genres": genres})
    return Dataset("movielens-100k", interactions, items)
