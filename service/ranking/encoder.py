"""Ranking features for (user, item, context, retrieval score) rows.

Categorical fields: user id, item id, hour of day, weekday (row 0 = unknown, so a missing
context or an id the model never saw is a default). Multi-valued: the item's attributes.
Numeric: the retrieval score, as the two-tower logit (cosine / temperature, the scale it
was trained on), the item's log popularity scaled to [0, 1], and the candidate's place in
retrieval's list (log(1 + place), about [0, 1] over the candidates of a request): a score
says how close an item is, its place how it compares with the user's other candidates.
A model trained before a field existed reads only the fields it was built with.
"""

from dataclasses import dataclass

import numpy as np
import torch

from service.data.feature_space import FeatureSpace

HOUR_ROWS, WEEKDAY_ROWS = 25, 8
NUMERIC_FIELDS = ("retrieval_score", "item_log_popularity", "retrieval_rank")
RANK_SCALE = float(np.log1p(200))  # about the candidates a request ranks


@dataclass
class RankingBatch:
    categorical: torch.Tensor
    attributes: torch.Tensor
    numeric: torch.Tensor


def field_sizes(features: FeatureSpace) -> tuple[int, ...]:
    return (features.users.size, features.items.size, HOUR_ROWS, WEEKDAY_ROWS)


class RankingEncoder:
    def __init__(
        self, features: FeatureSpace, score_scale: float, numeric_fields: int = len(NUMERIC_FIELDS)
    ):
        """`numeric_fields`: how many of `NUMERIC_FIELDS` the model was built with."""
        self.features = features
        self.score_scale = score_scale
        self.numeric_fields = numeric_fields
        self._log_popularity = features.item_log_popularity / max(
            features.item_log_popularity.max(), 1.0
        )

    def encode_rows(
        self,
        user_rows: np.ndarray,
        item_rows: np.ndarray,
        hour_rows: np.ndarray,
        weekday_rows: np.ndarray,
        retrieval_scores: np.ndarray,
        retrieval_ranks: np.ndarray,
    ) -> RankingBatch:
        categorical = np.stack([user_rows, item_rows, hour_rows, weekday_rows], axis=1)
        numeric = np.stack(
            [
                retrieval_scores * self.score_scale,
                self._log_popularity[item_rows],
                np.log1p(retrieval_ranks) / RANK_SCALE,
            ][: self.numeric_fields],
            axis=1,
        )
        return RankingBatch(
            torch.from_numpy(categorical.astype(np.int64)),
            torch.from_numpy(self.features.item_attributes[item_rows]),
            torch.from_numpy(numeric.astype(np.float32)),
        )

    def encode_request(
        self,
        user_id: int,
        item_ids: np.ndarray,
        retrieval_scores: np.ndarray,
        hour: int | None,
        weekday: int | None,
    ) -> RankingBatch:
        """The candidates of one request, in retrieval order (their places are features)."""
        n = len(item_ids)
        user_row = self.features.users.rows(np.array([user_id], dtype=np.uint64))[0]
        return self.encode_rows(
            np.full(n, user_row),
            self.features.items.rows(item_ids),
            np.full(n, 0 if hour is None else hour + 1),
            np.full(n, 0 if weekday is None else weekday + 1),
            np.asarray(retrieval_scores, dtype=np.float32),
            np.arange(n),
        )
