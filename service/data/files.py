"""User data from CSV or Parquet files, and dataset specs as the CLI spells them."""

from pathlib import Path

import pandas as pd

from service.data.movielens import load_movielens_100k
from service.data.schema import DataError, Dataset
from service.data.synthetic import SyntheticConfig, generate


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv", ".txt"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    raise DataError(f"{path}: unsupported format {suffix!r}; use .csv, .tsv or .parquet")


def load_files(interactions: str | Path, items: str | Path | None = None) -> Dataset:
    catalog = read_table(items) if items else pd.DataFrame({"item_id": []})
    return Dataset(Path(interactions).stem, read_table(interactions), catalog)


def synthetic_config(spec: str) -> SyntheticConfig:
    """The configuration a `synthetic[:opts]` spec names."""
    fields = SyntheticConfig.__dataclass_fields__
    overrides: dict[str, int | float] = {}
    for part in filter(None, spec.partition(":")[2].split(",")):
        key, _, value = part.partition("=")
        if key not in fields or key in ("interests_per_user", "interactions_per_user"):
            raise DataError(f"unknown synthetic option {key!r}")
        kind = float if fields[key].type in (float, "float") else int
        try:
            overrides[key] = kind(value)
        except ValueError:
            raise DataError(f"synthetic option {key!r}: {value!r} is not a number") from None
    try:
        return SyntheticConfig(**overrides)
    except ValueError as exc:
        raise DataError(f"synthetic dataset: {exc}") from None


def load_dataset(spec: str) -> Dataset:
    """`synthetic`, `synthetic:users=500,items=800,seed=3` (any `SyntheticConfig` field, the
    drift ones included) or `movielens-100k:PATH`."""
    name, _, arg = spec.partition(":")
    if name == "synthetic":
        return generate(synthetic_config(spec))
    if name == "movielens-100k":
        if not arg:
            raise DataError("movielens-100k needs a path: movielens-100k:PATH")
        return load_movielens_100k(arg)
    raise DataError(f"unknown dataset {spec!r}; use synthetic[:opts] or movielens-100k:PATH")
