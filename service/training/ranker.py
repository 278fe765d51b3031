"""Training data and training loop for the ranker.

Positives are observed interactions. Each positive gets negatives for the same user and
context: some drawn from what retrieval would put in front of that user at that time
(hard negatives: the ranker's job is to reorder retrieval's candidates) and some uniform.
The retrieval score of every row comes from the user vector as of the positive's
timestamp, so training sees what serving sees. Validation rows are each user's latest
interactions, so early stopping measures the future the ranker will serve.
"""

import logging
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch

from service.data.context import context_rows
from service.data.feature_space import FeatureSpace
from service.ranking.compression import (
    METHODS,
    CompressionConfig,
    compress,
    model_bytes,
)
from service.ranking.encoder import NUMERIC_FIELDS, RankingEncoder, field_sizes
from service.ranking.models import RankerVariant, build_ranker
from service.retrieval.index import ItemIndex
from service.retrieval.two_tower import TwoTower, history_before
from service.training.loop import LoopConfig, binary_metrics, fit_binary, log_odds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankerTrainConfig:
    hard_negatives: int = 4
    random_negatives: int = 1
    hard_pool: int = 200  # about the candidates a request ranks
    context_dropout: float = 0.1
    max_positives: int = 300_000
    epochs: int = 8
    patience: int = 2
    batch_size: int = 2048
    learning_rate: float = 1e-3
    weight_decay: float = 1e-6
    validation_fraction: float = 0.1
    dim: int = 16
    model: Literal["deepfm", "dcn_v2"] = "deepfm"
    rank: int | None = None  # factorised tables trained end to end: r-dim codes per row
    # Post-training compressed variants saved beside the trained model (full tables only);
    # which one serves is a setting (RECSYS_RANKER_VARIANT).
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    calibration_rows: int = (
        4096  # training rows whose layer outputs output-feature compression reads
    )
    seed: int = 0


@dataclass
class RankingRows:
    user_rows: np.ndarray
    item_rows: np.ndarray
    hour_rows: np.ndarray
    weekday_rows: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    validation: np.ndarray  # bool: the row belongs to one of the user's latest positives

    def take(self, index: np.ndarray) -> "RankingRows":
        return RankingRows(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def build_rows(
    interactions: pd.DataFrame,
    features: FeatureSpace,
    two_tower: TwoTower,
    index: ItemIndex,
    item_vectors: np.ndarray,
    config: RankerTrainConfig,
) -> RankingRows:
    rng = np.random.default_rng(config.seed)
    user_rows, item_rows, history = history_before(
        interactions, features, two_tower.config.history_length
    )
    timestamps = interactions["timestamp"].to_numpy()
    position = interactions.groupby("user_id", sort=False).cumcount().to_numpy()
    count = interactions.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    latest = position >= count - np.floor(count * config.validation_fraction)
    if len(user_rows) > config.max_positives:
        keep = np.sort(rng.choice(len(user_rows), config.max_positives, replace=False))
        user_rows, item_rows, history, timestamps, latest = (
            a[keep] for a in (user_rows, item_rows, history, timestamps, latest)
        )
    with torch.inference_mode():
        user_vectors = torch.cat(
            [
                two_tower.user_from_rows(
                    torch.from_numpy(user_rows[s : s + 8192]),
                    torch.from_numpy(history[s : s + 8192]),
                )
                for s in range(0, len(user_rows), 8192)
            ]
        ).numpy()
    n = len(user_rows)
    _, pool_ids = index.search(user_vectors, config.hard_pool)
    pool_rows = features.items.rows(pool_ids.reshape(-1)).reshape(n, -1)
    picks = rng.integers(0, pool_rows.shape[1], size=(n, config.hard_negatives))
    hard = np.take_along_axis(pool_rows, picks, axis=1)
    uniform = rng.integers(1, features.items.size, size=(n, config.random_negatives))
    negatives = np.concatenate([hard, uniform], axis=1)

    # Drop negatives the user actually interacted with at any time in the training data.
    seen = np.unique(
        features.users.rows(interactions["user_id"].to_numpy()) * features.items.size
        + features.items.rows(interactions["item_id"].to_numpy())
    )
    negative_keys = user_rows[:, None] * features.items.size + negatives
    valid = ~np.isin(negative_keys, seen) & (negatives > 0)

    per_row = 1 + negatives.shape[1]
    all_items = np.concatenate([item_rows[:, None], negatives], axis=1)
    all_valid = np.concatenate([np.ones((n, 1), bool), valid], axis=1).reshape(-1)
    hour, weekday = context_rows(timestamps)
    drop = rng.random(n) < config.context_dropout
    hour, weekday = np.where(drop, 0, hour), np.where(drop, 0, weekday)
    flat_items = all_items.reshape(-1)
    flat_users = np.repeat(user_rows, per_row)
    scores = np.einsum(
        "nd,nkd->nk", user_vectors, item_vectors[np.maximum(all_items - 1, 0)]
    ).reshape(-1)
    labels = np.tile(np.r_[1.0, np.zeros(per_row - 1)], n).astype(np.float32)
    rows = RankingRows(
        flat_users,
        flat_items,
        np.repeat(hour, per_row),
        np.repeat(weekday, per_row),
        scores.astype(np.float32),
        labels,
        np.repeat(latest, per_row),
    )
    return rows.take(np.flatnonzero(all_valid))


def _predict(
    model: torch.nn.Module, encoder: RankingEncoder, rows: RankingRows, batch_size: int = 16384
) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(rows.labels), batch_size):
            part = rows.take(np.arange(s, min(s + batch_size, len(rows.labels))))
            batch = encoder.encode_rows(
                part.user_rows, part.item_rows, part.hour_rows, part.weekday_rows, part.scores
            )
            out.append(
                torch.sigmoid(model(batch.categorical, batch.attributes, batch.numeric)).numpy()
            )
    return np.concatenate(out)


def train_ranker(
    rows: RankingRows, features: FeatureSpace, config: RankerTrainConfig, score_scale: float
) -> tuple[torch.nn.Module, dict]:
    """`score_scale` turns retrieval cosines into two-tower logits (1 / temperature)."""
    torch.manual_seed(config.seed)  # the initial weights
    encoder = RankingEncoder(features, score_scale)
    model = build_ranker(
        config.model,
        {
            "field_sizes": field_sizes(features),
            "attribute_size": features.attribute_size,
            "numeric_fields": len(NUMERIC_FIELDS),
            "dim": config.dim,
            "rank": config.rank,
        },
        start_from_numeric=NUMERIC_FIELDS.index("retrieval_score"),
    )
    validation, train = (
        rows.take(np.flatnonzero(rows.validation)),
        rows.take(np.flatnonzero(~rows.validation)),
    )

    def batch_of(index: np.ndarray) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        part = train.take(index)
        batch = encoder.encode_rows(
            part.user_rows, part.item_rows, part.hour_rows, part.weekday_rows, part.scores
        )
        return (batch.categorical, batch.attributes, batch.numeric), torch.from_numpy(part.labels)

    # The retrieval score starts as the only signal: the bias offsets its mean logit.
    start_bias = log_odds(float(train.labels.mean())) - float(train.scores.mean()) * score_scale
    loop = LoopConfig.of(config)
    epochs = fit_binary(
        model,
        len(train.labels),
        batch_of,
        lambda m: _predict(m, encoder, validation),
        validation.labels,
        loop,
        start_bias,
        "ranker",
    )
    history = [
        {
            "epoch": e["epoch"],
            "val_auc": e["auc"],
            "val_logloss": e["logloss"],
            "val_mean_prediction": e["mean_prediction"],
        }
        for e in epochs
    ]
    best = max(history, key=lambda e: e["val_auc"])
    metrics = {
        "val_auc": best["val_auc"],
        "val_logloss": best["val_logloss"],
        "val_mean_prediction": best["val_mean_prediction"],
        "val_click_rate": float(validation.labels.mean()),
        "epochs": history,
        "rows": int(len(rows.labels)),
        "bytes": model_bytes(model),
        "config": asdict(config),
    }
    return model, metrics


def compress_ranker(
    model: torch.nn.Module,
    rows: RankingRows,
    features: FeatureSpace,
    config: RankerTrainConfig,
    score_scale: float,
) -> dict[str, RankerVariant]:
    """The trained full-table ranker compressed by every method, each measured on the
    validation rows; none for a factorised ranker (its tables are low-rank already)."""
    if model.fields.layout.rank is not None:
        return {}
    encoder = RankingEncoder(features, score_scale)
    train, validation = np.flatnonzero(~rows.validation), rows.take(np.flatnonzero(rows.validation))
    picked = rows.take(
        np.random.default_rng(config.seed).choice(
            train, min(config.calibration_rows, len(train)), replace=False
        )
    )
    batch = encoder.encode_rows(
        picked.user_rows, picked.item_rows, picked.hour_rows, picked.weekday_rows, picked.scores
    )
    calibration = (batch.categorical, batch.attributes, batch.numeric)
    variants, trained_bytes = {}, model_bytes(model)["total"]
    for method in METHODS:
        compact, plan = compress(model, method, config.compression, calibration)
        predicted = _predict(compact, encoder, validation)
        size = model_bytes(compact)
        measured = binary_metrics(validation.labels, predicted)
        metrics = {
            "val_auc": measured["auc"],
            "val_logloss": measured["logloss"],
            "bytes": size,
            "ratio": round(trained_bytes / size["total"], 2),
        }
        log.info(
            "ranker %s: %.2fx smaller, val AUC %.4f", method, metrics["ratio"], metrics["val_auc"]
        )
        variants[method] = RankerVariant(compact, plan, metrics)
    return variants
