"""The one training loop of the binary classifiers (the served ranker and the standalone CTR
models): start calibrated, Adam on binary cross-entropy over shuffled mini-batches, validation
AUC and logloss after every epoch, early stopping on AUC with the best epoch's weights
restored, a progress bar with the rate and the latest validation AUC."""

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)

# A batch of examples by index: the model's inputs and the labels.
BatchOf = Callable[[np.ndarray], tuple[tuple[torch.Tensor, ...], torch.Tensor]]


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    patience: int  # epochs without a better validation AUC before stopping
    batch_size: int
    learning_rate: float
    weight_decay: float
    seed: int  # the order of the examples in each epoch

    @classmethod
    def of(cls, config) -> "LoopConfig":
        """The loop's fields of a model's training configuration (the ranker's, a CTR model's)."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


class EarlyStopping:
    """Keeps the weights of the epoch with the best validation figure (AUC, or any figure
    where higher is better) and says when `patience` epochs in a row have not beaten it."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_auc = -np.inf
        self._state: dict | None = None
        self._stale = 0

    def should_stop(self, model: nn.Module, auc: float) -> bool:
        if auc > self.best_auc:
            self.best_auc, self._state, self._stale = auc, copy.deepcopy(model.state_dict()), 0
            return False
        self._stale += 1
        return self._stale >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        model.load_state_dict(self._state)
        model.eval()


def binary_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict:
    return {
        "auc": float(roc_auc_score(labels, predicted)),
        "logloss": float(log_loss(labels, np.clip(predicted, 1e-7, 1 - 1e-7), labels=[0, 1])),
    }


def log_odds(rate: float) -> float:
    rate = float(np.clip(rate, 1e-4, 1 - 1e-4))
    return float(np.log(rate / (1 - rate)))


def fit_binary(
    model: nn.Module,
    examples: int,
    batch_of: BatchOf,
    predict_validation: Callable[[nn.Module], np.ndarray],
    validation_labels: np.ndarray,
    config: LoopConfig,
    start_bias: float,
    name: str,
) -> list[dict]:
    """Train `model` in place on `examples` training examples (`batch_of(indices)`), its
    output bias first set to `start_bias` (the logit of the training click rate, so the
    untrained model predicts it). Returns each epoch's validation `auc`, `logloss` and
    `mean_prediction`; the best epoch's weights are restored."""
    rng = np.random.default_rng(config.seed)
    with torch.no_grad():
        model.bias.fill_(start_bias)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps = max(1, examples // config.batch_size)
    stopping, history = EarlyStopping(config.patience), []
    with tqdm(total=config.epochs * steps, desc=name, unit="batch", mininterval=2) as bar:
        for epoch in range(config.epochs):
            model.train()
            order = rng.permutation(examples)
            for step in range(steps):
                inputs, labels = batch_of(
                    order[step * config.batch_size : (step + 1) * config.batch_size]
                )
                loss = F.binary_cross_entropy_with_logits(model(*inputs), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update()
            predicted = predict_validation(model)
            metrics = {
                "epoch": epoch + 1,
                **binary_metrics(validation_labels, predicted),
                "mean_prediction": float(predicted.mean()),
            }
            history.append(metrics)
            bar.set_postfix(epoch=epoch + 1, val_auc=f"{metrics['auc']:.4f}")
            log.info(
                "%s epoch %d/%d val AUC %.4f logloss %.4f",
                name,
                epoch + 1,
                config.epochs,
                metrics["auc"],
                metrics["logloss"],
            )
            if stopping.should_stop(model, metrics["auc"]):
                break
    stopping.restore_best(model)
    return history
