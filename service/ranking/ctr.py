"""Training and scoring a CTR model on encoded rows (`FieldMap.encode`): Adam on binary
cross-entropy, validation AUC and logloss after every epoch, early stopping on AUC with the
best epoch's weights restored."""

import copy
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn
from tqdm import tqdm

from service.ranking.fields import EncodedRows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CtrTrainConfig:
    epochs: int = 20
    patience: int = 2  # epochs without a better validation AUC before stopping
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0


class EarlyStopping:
    """Keeps the weights of the epoch with the best validation AUC and says when `patience`
    epochs in a row have not beaten it."""

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


def tensors(rows: EncodedRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.from_numpy(rows.categorical), torch.from_numpy(rows.multi), torch.from_numpy(rows.numeric)


def predict(model: nn.Module, rows: EncodedRows, batch_size: int = 16384) -> np.ndarray:
    """Click probabilities for every row, in one pass per `batch_size` rows."""
    model.eval()
    categorical, multi, numeric = tensors(rows)
    out = []
    with torch.inference_mode():
        for s in range(0, len(rows), batch_size):
            out.append(torch.sigmoid(model(categorical[s : s + batch_size], multi[s : s + batch_size], numeric[s : s + batch_size])))
    return torch.cat(out).numpy() if out else np.empty(0, np.float32)


def evaluate(labels: np.ndarray, predicted: np.ndarray) -> dict:
    return {
        "auc": float(roc_auc_score(labels, predicted)),
        "logloss": float(log_loss(labels, np.clip(predicted, 1e-7, 1 - 1e-7), labels=[0, 1])),
    }


def train_ctr(model: nn.Module, train: EncodedRows, valid: EncodedRows, config: CtrTrainConfig, name: str = "ctr") -> dict:
    """Train `model` in place; returns the per-epoch history and the best validation metrics."""
    if train.labels is None or valid.labels is None:
        raise ValueError("training and validation rows need labels")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    base_rate = float(np.clip(train.labels.mean(), 1e-4, 1 - 1e-4))
    with torch.no_grad():  # start calibrated: the untrained model predicts the click rate
        model.bias.fill_(float(np.log(base_rate / (1 - base_rate))))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    categorical, multi, numeric = tensors(train)
    labels = torch.from_numpy(train.labels)
    steps = max(1, len(train) // config.batch_size)
    stopping, history = EarlyStopping(config.patience), []
    with tqdm(total=config.epochs * steps, desc=name, unit="batch", mininterval=2) as bar:
        for epoch in range(config.epochs):
            model.train()
            order = torch.from_numpy(rng.permutation(len(train)))
            for step in range(steps):
                batch = order[step * config.batch_size : (step + 1) * config.batch_size]
                loss = F.binary_cross_entropy_with_logits(model(categorical[batch], multi[batch], numeric[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update()
            metrics = {"epoch": epoch + 1, **evaluate(valid.labels, predict(model, valid))}
            history.append(metrics)
            bar.set_postfix(epoch=epoch + 1, val_auc=f"{metrics['auc']:.4f}")
            log.info("%s epoch %d/%d val AUC %.4f logloss %.4f", name, epoch + 1, config.epochs, metrics["auc"], metrics["logloss"])
            if stopping.should_stop(model, metrics["auc"]):
                break
    stopping.restore_best(model)
    return {"best": max(history, key=lambda e: e["auc"]), "epochs": history, "config": asdict(config)}
