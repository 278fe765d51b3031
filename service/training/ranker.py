"""Training data and training loops for the ranker.

Served from validation (`train_listwise_ranker`): the ranker learns on candidate lists that
retrieval made for interactions its model never trained on (each user's latest interaction,
held out by `recsys train`'s validation), with a softmax over each list. That is what it
serves: reorder retrieval's candidates for a moment the retriever has not seen. Trained on
interactions the retriever fitted, a ranker learns from retrieval scores that are better
than they will ever be at serving time, and makes answers worse.

Without validation (`build_rows` + `train_ranker`), positives are observed interactions.
Each positive gets negatives for the same user and context: some drawn from what retrieval
would put in front of that user at that time (hard negatives) and some uniform. The
retrieval score of every row comes from the user vector as of the positive's timestamp.
Validation rows are each user's latest interactions, so early stopping measures the
future the ranker will serve.
"""

import logging
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from service.data.context import context_rows
from service.data.feature_space import FeatureSpace
from service.ranking.compression import (
    METHODS,
    CompressionConfig,
    compress,
    model_bytes,
)
from service.ranking.encoder import NUMERIC_FIELDS, RANK_SCALE, RankingEncoder, field_sizes
from service.ranking.models import RankerVariant, build_ranker
from service.retrieval.index import ItemIndex
from service.retrieval.two_tower import TwoTower, history_before
from service.training.loop import (
    EarlyStopping,
    LoopConfig,
    binary_metrics,
    fit_binary,
    log_odds,
)

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
    lists_per_batch: int = 32  # listwise training: candidate lists per step


@dataclass
class RankingRows:
    user_rows: np.ndarray
    item_rows: np.ndarray
    hour_rows: np.ndarray
    weekday_rows: np.ndarray
    scores: np.ndarray
    ranks: np.ndarray  # the candidate's place in retrieval's list, 0 = first
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
    pool_scores, pool_ids = index.search(user_vectors, config.hard_pool)
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
    # Each row's place in the user's retrieved list: the pool items scoring above it.
    by_row = scores.reshape(n, per_row)
    ranks = np.concatenate(
        [
            (pool_scores[s : s + 8192, None, :] > by_row[s : s + 8192, :, None]).sum(2)
            for s in range(0, n, 8192)
        ]
    )
    labels = np.tile(np.r_[1.0, np.zeros(per_row - 1)], n).astype(np.float32)
    rows = RankingRows(
        flat_users,
        flat_items,
        np.repeat(hour, per_row),
        np.repeat(weekday, per_row),
        scores.astype(np.float32),
        ranks.reshape(-1),
        labels,
        np.repeat(latest, per_row),
    )
    return rows.take(np.flatnonzero(all_valid))


def _encode(encoder: RankingEncoder, rows: RankingRows):
    return encoder.encode_rows(
        rows.user_rows, rows.item_rows, rows.hour_rows, rows.weekday_rows, rows.scores, rows.ranks
    )


def _predict(
    model: torch.nn.Module, encoder: RankingEncoder, rows: RankingRows, batch_size: int = 16384
) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(rows.labels), batch_size):
            part = rows.take(np.arange(s, min(s + batch_size, len(rows.labels))))
            batch = _encode(encoder, part)
            out.append(
                torch.sigmoid(model(batch.categorical, batch.attributes, batch.numeric)).numpy()
            )
    return np.concatenate(out)


def new_ranker(features: FeatureSpace, config: RankerTrainConfig) -> torch.nn.Module:
    """An untrained ranker of `config.model` over `features`' fields."""
    torch.manual_seed(config.seed)  # the initial weights
    return build_ranker(
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


def train_ranker(
    rows: RankingRows, features: FeatureSpace, config: RankerTrainConfig, score_scale: float
) -> tuple[torch.nn.Module, dict]:
    """`score_scale` turns retrieval cosines into two-tower logits (1 / temperature)."""
    encoder = RankingEncoder(features, score_scale)
    model = new_ranker(features, config)
    validation, train = (
        rows.take(np.flatnonzero(rows.validation)),
        rows.take(np.flatnonzero(~rows.validation)),
    )

    def batch_of(index: np.ndarray) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        part = train.take(index)
        batch = _encode(encoder, part)
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
        "training": "pointwise, on the training interactions",
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
    batch = _encode(encoder, picked)
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


@dataclass
class CandidateLists:
    """Retrieval's candidate lists, one per held-out interaction, as the ranker gets them:
    item ids in retrieval order (`present` marks the filled places of shorter lists), their
    retrieval scores, and the place of the interacted item (-1: retrieval missed it). Ids,
    not rows: the lists come from a model of part of the data, the ranker from all of it."""

    user_ids: np.ndarray  # (N,) uint64
    item_ids: np.ndarray  # (N, L) uint64
    present: np.ndarray  # (N, L) bool
    scores: np.ndarray  # (N, L) float32
    targets: np.ndarray  # (N,)
    hour_rows: np.ndarray  # (N,) 0 = unknown
    weekday_rows: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: np.ndarray) -> "CandidateLists":
        return CandidateLists(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def rows(self, features: FeatureSpace, validation: np.ndarray) -> RankingRows:
        """One row per candidate, labelled 1 for the interacted item; `validation` (N,) bool
        marks the lists whose rows are validation rows."""
        n, length = self.item_ids.shape
        labels = np.arange(length)[None, :] == self.targets[:, None]
        keep = np.flatnonzero(self.present.reshape(-1))
        return RankingRows(
            np.repeat(features.users.rows(self.user_ids), length),
            features.items.rows(self.item_ids.reshape(-1)),
            np.repeat(self.hour_rows, length),
            np.repeat(self.weekday_rows, length),
            self.scores.reshape(-1),
            np.tile(np.arange(length), n),
            labels.reshape(-1).astype(np.float32),
            np.repeat(validation, length),
        ).take(keep)


def list_logits(
    model: torch.nn.Module, encoder: RankingEncoder, lists: CandidateLists
) -> torch.Tensor:
    """(N, L) ranker logits, the empty places at -inf."""
    rows = lists.rows(encoder.features, np.zeros(len(lists), bool))
    present = torch.from_numpy(lists.present.reshape(-1))
    logits = torch.full((present.numel(),), -torch.inf)
    batch = _encode(encoder, rows)
    logits[present] = model(batch.categorical, batch.attributes, batch.numeric)
    return logits.view(lists.present.shape)


def ranked_places(
    model: torch.nn.Module, encoder: RankingEncoder, lists: CandidateLists
) -> np.ndarray:
    """(N,) the place the ranker gives each list's interacted item (0 = first; -1: not in
    the list); ties keep retrieval order, as serving's stable sort does."""
    model.eval()
    with torch.inference_mode():
        logits = torch.cat(
            [
                list_logits(model, encoder, lists.take(np.arange(s, min(s + 256, len(lists)))))
                for s in range(0, len(lists), 256)
            ]
        ).numpy()
    at = np.maximum(lists.targets, 0)
    target = logits[np.arange(len(lists)), at][:, None]
    before = np.arange(logits.shape[1])[None, :] < at[:, None]
    places = (logits > target).sum(1) + ((logits == target) & before).sum(1)
    return np.where(lists.targets >= 0, places, -1)


def train_listwise_ranker(
    lists: CandidateLists, features: FeatureSpace, config: RankerTrainConfig, score_scale: float
) -> tuple[torch.nn.Module, dict, RankingRows]:
    """The ranker trained on `lists` with a softmax over each list's candidates (the lists
    retrieval missed the item in teach reordering nothing and are left out). It starts as
    retrieval order (its place's weight alone, the deep part's output 0), and early
    stopping on the cross-entropy of a seeded `validation_fraction` of the lists keeps the
    best epoch, the start included: where nothing it sees predicts better than retrieval,
    it stays retrieval order. Returns the model, its metrics, and the lists as rows (those
    of the validation lists marked) for `compress_ranker`."""
    encoder = RankingEncoder(features, score_scale)
    model = new_ranker(features, config)
    with torch.no_grad():  # retrieval order, whatever sources it interleaves: p ~ 1 / (1 + place)
        model.mlp[-1].weight.zero_()
        model.mlp[-1].bias.zero_()
        model.fields.numeric_linear.zero_()
        model.fields.numeric_linear[NUMERIC_FIELDS.index("retrieval_rank")] = -RANK_SCALE
    rng = np.random.default_rng(config.seed)
    usable = rng.permutation(np.flatnonzero(lists.targets >= 0))
    held = max(1, int(round(len(usable) * config.validation_fraction)))
    validation, train = lists.take(usable[:held]), lists.take(usable[held:])
    # Some requests come without a context: the ranker learns the unknown rows too.
    drop = rng.random(len(train)) < config.context_dropout
    train.hour_rows = np.where(drop, 0, train.hour_rows)
    train.weekday_rows = np.where(drop, 0, train.weekday_rows)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )

    def loss_of(part: CandidateLists) -> torch.Tensor:
        return F.cross_entropy(list_logits(model, encoder, part), torch.from_numpy(part.targets))

    def validation_loss() -> float:
        model.eval()
        with torch.inference_mode():
            return float(loss_of(validation))

    steps = max(1, len(train) // config.lists_per_batch)
    stopping = EarlyStopping(config.patience)  # on minus the loss: higher is better
    history = [{"epoch": 0, "val_list_loss": validation_loss()}]
    stopping.should_stop(model, -history[0]["val_list_loss"])  # the start is a candidate
    with tqdm(total=config.epochs * steps, desc="ranker", unit="batch", mininterval=2) as bar:
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = rng.permutation(len(train))
            for step in range(steps):
                part = train.take(
                    order[step * config.lists_per_batch : (step + 1) * config.lists_per_batch]
                )
                loss = loss_of(part)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update()
            measured = validation_loss()
            history.append({"epoch": epoch, "val_list_loss": measured})
            bar.set_postfix(epoch=epoch, val_loss=f"{measured:.4f}")
            log.info("ranker epoch %d/%d validation list loss %.4f", epoch, config.epochs, measured)
            if stopping.should_stop(model, -measured):
                break
    stopping.restore_best(model)
    best = min(history, key=lambda e: e["val_list_loss"])
    rows = lists.take(usable).rows(features, np.arange(len(usable)) < held)
    measured = binary_metrics(
        rows.labels[rows.validation],
        _predict(model, encoder, rows.take(np.flatnonzero(rows.validation))),
    )
    metrics = {
        "training": "listwise, on validation's candidate lists",
        "lists": int(len(usable)),
        "best_epoch": best["epoch"],
        "val_list_loss": best["val_list_loss"],
        "val_auc": measured["auc"],
        "val_logloss": measured["logloss"],
        "epochs": history,
        "rows": int(len(rows.labels)),
        "bytes": model_bytes(model),
        "config": asdict(config),
    }
    return model, metrics, rows
