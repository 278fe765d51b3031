"""The request context a timestamp implies: hour of day and weekday, in UTC, as the 1-based
rows the models' context fields use (row 0: no context)."""

import numpy as np


def context_rows(timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hour and weekday rows (1-based) of epoch seconds, in UTC."""
    timestamps = np.asarray(timestamps, dtype=np.int64)
    hour = (timestamps // 3600) % 24
    weekday = (timestamps // 86_400 + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return hour + 1, weekday + 1
