"""Training and scoring a standalone CTR model on encoded rows (`FieldMap.encode`), through
the shared training loop (`service.training.loop`)."""

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from service.ctr.field_map import EncodedRows
from service.training.loop import LoopConfig, fit_binary, log_odds


@dataclass(frozen=True)
class CtrTrainConfig:
    epochs: int = 20
    patience: int = 2  # epochs without a better validation AUC before stopping
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0


def tensors(rows: EncodedRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(rows.categorical),
        torch.from_numpy(rows.multi),
        torch.from_numpy(rows.numeric),
    )


def predict(model: nn.Module, rows: EncodedRows, batch_size: int = 16384) -> np.ndarray:
    """Click probabilities for every row, in one pass per `batch_size` rows."""
    model.eval()
    categorical, multi, numeric = tensors(rows)
    out = []
    with torch.inference_mode():
        for s in range(0, len(rows), batch_size):
            out.append(
                torch.sigmoid(
                    model(
                        categorical[s : s + batch_size],
                        multi[s : s + batch_size],
                        numeric[s : s + batch_size],
                    )
                )
            )
    return torch.cat(out).numpy() if out else np.empty(0, np.float32)


def train_ctr(
    model: nn.Module,
    train: EncodedRows,
    valid: EncodedRows,
    config: CtrTrainConfig,
    name: str = "ctr",
) -> dict:
    """Train `model` in place; returns the per-epoch history and the best validation metrics."""
    if train.labels is None or valid.labels is None:
        raise ValueError("training and validation rows need labels")
    torch.manual_seed(config.seed)
    inputs, labels = tensors(train), torch.from_numpy(train.labels)

    def batch_of(index: np.ndarray) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        index = torch.from_numpy(index)
        return tuple(column[index] for column in inputs), labels[index]

    loop = LoopConfig.of(config)
    history = fit_binary(
        model,
        len(train),
        batch_of,
        lambda m: predict(m, valid),
        valid.labels,
        loop,
        log_odds(float(train.labels.mean())),
        name,
    )
    return {
        "best": max(history, key=lambda e: e["auc"]),
        "epochs": history,
        "config": asdict(config),
    }
