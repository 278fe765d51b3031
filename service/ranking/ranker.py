"""The serving-side ranker: one forward pass over all candidates of a request."""

import numpy as np
import torch
from torch import nn

from service.data.feature_space import FeatureSpace
from service.ranking.encoder import RankingEncoder


class Ranker:
    def __init__(self, model: nn.Module, features: FeatureSpace, score_scale: float):
        """`model`: DeepFM or DCN-v2 (`service.ranking.models`)."""
        self.model = model.eval()
        self.encoder = RankingEncoder(features, score_scale, model.fields.layout.numeric_fields)

    def score(
        self,
        user_id: int,
        item_ids: np.ndarray,
        retrieval_scores: np.ndarray,
        hour: int | None = None,
        weekday: int | None = None,
    ) -> np.ndarray:
        """Scores (float32, higher first), aligned with `item_ids`, which come in retrieval
        order. A ranker trained on validation's lists orders them; one trained pointwise
        (without validation) gives click probabilities."""
        if len(item_ids) == 0:
            return np.empty(0, dtype=np.float32)
        batch = self.encoder.encode_request(user_id, item_ids, retrieval_scores, hour, weekday)
        with torch.inference_mode():
            logits = self.model(batch.categorical, batch.attributes, batch.numeric)
        return torch.sigmoid(logits).numpy().astype(np.float32)
