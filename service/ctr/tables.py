"""The CTR tables a standalone CTR model trains on, by spec, each with the field map built
from its training split:

- `criteo:PATH`: a folder laid out like criteo-kaggle-8k (label, 13 counts as numeric
  fields, 26 hashed categoricals; values seen fewer than 3 times share the default row);
- any interaction dataset `recsys train` reads (`movielens-100k:PATH`, `synthetic[:opts]`)
  as a click table: every interaction a positive with 4 unseen negatives, temporal split,
  fields user id, item id, hour, weekday and the item's first attribute (genres, category)
  as the multi-valued field.
"""

import pandas as pd

from service.ctr.field_map import FieldMap
from service.data.criteo import CATEGORICAL_COLUMNS, INTEGER_COLUMNS, LABEL, load_criteo_splits
from service.data.ctr import interactions_as_ctr
from service.data.files import load_dataset
from service.data.schema import DataError

SPLITS = ("train", "dev", "test")
CRITEO_MIN_COUNT = 3
NEGATIVES_PER_POSITIVE = 4


def load_ctr_table(spec: str, seed: int = 0) -> tuple[FieldMap, dict[str, pd.DataFrame]]:
    """The field map and the train / dev / test frames of `spec`."""
    name, _, path = spec.partition(":")
    if name == "criteo":
        if not path:
            raise DataError("criteo needs a path: criteo:PATH")
        splits = load_criteo_splits(path)
        fields = FieldMap.build(
            splits["train"],
            list(CATEGORICAL_COLUMNS),
            list(INTEGER_COLUMNS),
            label=LABEL,
            min_count=CRITEO_MIN_COUNT,
        )
        return fields, splits
    dataset = load_dataset(spec)
    frame = interactions_as_ctr(dataset, negatives=NEGATIVES_PER_POSITIVE, seed=seed)
    splits = {split: frame[frame["split"] == split] for split in SPLITS}
    multi = dataset.attribute_columns[0] if dataset.attribute_columns else None
    fields = FieldMap.build(
        splits["train"], ["user_id", "item_id", "hour", "weekday"], [], multi=multi, label="label"
    )
    return fields, splits
