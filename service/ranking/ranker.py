"""The serving-side ranker: one forward pass over all candidates of a request."""

import logging
from typing import Literal

import numpy as np
import torch
from torch import nn

from service.data.feature_space import FeatureSpace
from service.ranking.encoder import RankingBatch, RankingEncoder
from service.ranking.kernel import RankerKernel

log = logging.getLogger(__name__)

# numpy: `RankerKernel` (the model's weights copied into numpy); torch: the model itself.
Runtime = Literal["numpy", "torch"]


class Ranker:
    def __init__(
        self,
        model: nn.Module,
        features: FeatureSpace,
        score_scale: float,
        runtime: Runtime = "numpy",
    ):
        """`model`: DeepFM or DCN-v2 (`service.ranking.models`); `runtime`: which forward
        serves (a model the numpy kernel cannot copy serves through torch)."""
        self.model = model.eval()
        self.encoder = RankingEncoder(features, score_scale, model.fields.layout.numeric_fields)
        self.kernel = RankerKernel.of(self.model) if runtime == "numpy" else None
        if runtime == "numpy" and self.kernel is None:
            log.warning("the numpy ranker kernel cannot copy this model: it serves through torch")
        self.runtime: Runtime = "numpy" if self.kernel is not None else "torch"

    def encode(
        self,
        user_id: int,
        item_ids: np.ndarray,
        retrieval_scores: np.ndarray,
        hour: int | None = None,
        weekday: int | None = None,
    ) -> RankingBatch:
        """The model's inputs for a request's candidates, which come in retrieval order."""
        return self.encoder.encode_request(user_id, item_ids, retrieval_scores, hour, weekday)

    def forward(self, batch: RankingBatch) -> np.ndarray:
        """Scores (float32, higher first) of a batch's rows, in order. A ranker trained on
        validation's lists orders them; one trained pointwise (without validation) gives
        click probabilities."""
        if self.kernel is not None:
            return self.kernel(batch)
        with torch.inference_mode():
            logits = self.model(batch.categorical, batch.attributes, batch.numeric)
        return torch.sigmoid(logits).numpy().astype(np.float32)

    def score(
        self,
        user_id: int,
        item_ids: np.ndarray,
        retrieval_scores: np.ndarray,
        hour: int | None = None,
        weekday: int | None = None,
    ) -> np.ndarray:
        """Scores aligned with `item_ids` (`forward`)."""
        if len(item_ids) == 0:
            return np.empty(0, dtype=np.float32)
        return self.forward(self.encode(user_id, item_ids, retrieval_scores, hour, weekday))
