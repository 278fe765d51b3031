"""Criteo display-advertising rows in the Kaggle DAC `train.txt` format: tab-separated, no
header, 40 columns (label, 13 integer counts I1..I13, 26 hashed categoricals C1..C26), an
empty cell where a value is missing. `../shared/data/criteo-kaggle-8k` holds 8,000 such
rows split into train.csv / dev.csv / test.csv (the name notwithstanding, not CSV)."""

from pathlib import Path

import pandas as pd

from service.data.schema import DataError

LABEL = "label"
INTEGER_COLUMNS = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL_COLUMNS = tuple(f"C{i}" for i in range(1, 27))
COLUMNS = (LABEL, *INTEGER_COLUMNS, *CATEGORICAL_COLUMNS)
SPLITS = ("train", "dev", "test")


def read_criteo(path: str | Path) -> pd.DataFrame:
    """One file of rows: the label as int8, integers as float32 (NaN when missing),
    categoricals as strings ("" when missing)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    frame = pd.read_csv(
        path,
        sep="\t",
        header=None,
        names=list(COLUMNS),
        dtype={
            **dict.fromkeys(INTEGER_COLUMNS, "float32"),
            **dict.fromkeys(CATEGORICAL_COLUMNS, "string"),
        },
        keep_default_na=False,
        na_values={c: [""] for c in INTEGER_COLUMNS},
    )
    if frame[LABEL].isna().any() or not frame[LABEL].isin([0, 1]).all():
        raise DataError(f"{path}: the first column must be a 0/1 label")
    frame[LABEL] = frame[LABEL].astype("int8")
    frame[list(CATEGORICAL_COLUMNS)] = frame[list(CATEGORICAL_COLUMNS)].fillna("")
    return frame


def load_criteo_splits(folder: str | Path) -> dict[str, pd.DataFrame]:
    """train / dev / test of a folder laid out like criteo-kaggle-8k."""
    folder = Path(folder)
    missing = [s for s in SPLITS if not (folder / f"{s}.csv").is_file()]
    if missing:
        raise DataError(
            f"{folder}: no {', '.join(f'{s}.csv' for s in missing)}; point at the criteo-kaggle-8k folder"
        )
    return {split: read_criteo(folder / f"{split}.csv") for split in SPLITS}
