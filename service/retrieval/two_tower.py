"""Two-tower retrieval model (Yi et al. 2019): in-batch softmax with logQ correction.

User tower: user-id vector and the mean of the user's recent item-id vectors. Item tower:
item-id vector and the mean of its attribute vectors. Both end L2-normalised, so the FAISS
inner product is a cosine. The id vectors are what the embedding table stores; the
towers' dense layers ship in the artifact.
"""

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.data.feature_space import FeatureSpace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TwoTowerConfig:
    id_dim: int = 64
    hidden: int = 128
    out_dim: int = 64
    history_length: int = 50
    temperature: float = 0.05
    epochs: int = 10
    batch_size: int = 1024
    learning_rate: float = 3e-3
    weight_decay: float = 1e-6
    item_id_dropout: float = 0.1  # teaches the item tower to embed items from attributes alone
    seed: int = 0


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class TwoTower(nn.Module):
    def __init__(self, config: TwoTowerConfig, n_users: int, n_items: int, n_attributes: int):
        super().__init__()
        self.config = config
        d = config.id_dim
        self.user_id = nn.Embedding(n_users, d, padding_idx=0)
        self.item_id = nn.Embedding(n_items, d, padding_idx=0)
        self.attribute = nn.Embedding(n_attributes, d, padding_idx=0)
        for table in (self.user_id, self.item_id, self.attribute):
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0].zero_()
        self.user_mlp = _mlp(2 * d, config.hidden, config.out_dim)
        self.item_mlp = _mlp(2 * d, config.hidden, config.out_dim)

    @staticmethod
    def masked_mean(vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.unsqueeze(-1).to(vectors.dtype)
        return (vectors * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def user_tower(self, user_vectors: torch.Tensor, pooled_history: torch.Tensor) -> torch.Tensor:
        """From vectors as the embedding table holds them: what serving calls."""
        return F.normalize(self.user_mlp(torch.cat([user_vectors, pooled_history], -1)), dim=-1)

    def item_tower(self, item_rows: torch.Tensor, attribute_rows: torch.Tensor) -> torch.Tensor:
        return self.item_tower_from_vectors(self.item_id(item_rows), attribute_rows)

    def item_tower_from_vectors(
        self, item_vectors: torch.Tensor, attribute_rows: torch.Tensor
    ) -> torch.Tensor:
        """From item-id vectors as the embedding table holds them: what online updates call."""
        attributes = self.masked_mean(self.attribute(attribute_rows), attribute_rows > 0)
        return F.normalize(self.item_mlp(torch.cat([item_vectors, attributes], -1)), dim=-1)

    def user_from_rows(self, user_rows: torch.Tensor, history_rows: torch.Tensor) -> torch.Tensor:
        pooled = self.masked_mean(self.item_id(history_rows), history_rows > 0)
        return self.user_tower(self.user_id(user_rows), pooled)


class UserTowerKernel:
    """The user tower's dense layers as numpy arrays, for serving one request: torch's
    per-operation dispatch costs about 0.1 ms at batch size 1, a numpy pass a fraction of
    that. The layers do not change after training (online updates move id vectors only),
    so the copy stays exact; `TwoTower.user_tower` is the reference it is tested against."""

    def __init__(self, model: TwoTower):
        first, last = model.user_mlp[0], model.user_mlp[2]
        weight = first.weight.detach().numpy().T.astype(np.float32)
        d = model.config.id_dim
        # Two halves of the first layer instead of concatenating the inputs per request.
        self.w_user, self.w_history = weight[:d].copy(), weight[d:].copy()
        self.b_first = first.bias.detach().numpy().astype(np.float32)
        self.w_last = last.weight.detach().numpy().T.astype(np.float32).copy()
        self.b_last = last.bias.detach().numpy().astype(np.float32)

    def __call__(self, user_vectors: np.ndarray, pooled_history: np.ndarray) -> np.ndarray:
        hidden = np.maximum(
            user_vectors @ self.w_user + pooled_history @ self.w_history + self.b_first, 0.0
        )
        out = hidden @ self.w_last + self.b_last
        norm = np.sqrt(np.square(out).sum(-1, keepdims=True))  # np.linalg.norm costs 3x more here
        return out / np.maximum(norm, 1e-12)  # as F.normalize


def in_batch_softmax_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    item_rows: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Sampled softmax over the batch's items, corrected by log q(item) (Yi et al. 2019).

    An in-batch item equal to a row's own positive (an accidental hit) is masked out of
    that row's negatives.
    """
    logits = user @ item.T / temperature - log_q.unsqueeze(0)
    same_item = item_rows.unsqueeze(0) == item_rows.unsqueeze(1)
    accidental = same_item & ~torch.eye(len(item_rows), dtype=torch.bool)
    logits = logits.masked_fill(accidental, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(item_rows)))


def history_before(
    interactions: pd.DataFrame, features: FeatureSpace, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each interaction: user row, item row, and the rows of the `length` items the
    user interacted with before it (0-padded). Interactions must be sorted by user, time."""
    user_rows = features.users.rows(interactions["user_id"].to_numpy())
    item_rows = features.items.rows(interactions["item_id"].to_numpy())
    history = np.zeros((len(interactions), length), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, user_rows[1:] != user_rows[:-1]])
    ends = np.r_[starts[1:], len(user_rows)]
    for start, end in zip(starts, ends):
        for i in range(start + 1, end):
            past = item_rows[max(start, i - length) : i]
            history[i, length - len(past) :] = past
    return user_rows, item_rows, history


def train_two_tower(
    interactions: pd.DataFrame, features: FeatureSpace, config: TwoTowerConfig
) -> tuple[TwoTower, dict]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = TwoTower(config, features.users.size, features.items.size, features.attribute_size)
    user_rows, item_rows, history = history_before(interactions, features, config.history_length)
    item_attributes = torch.from_numpy(features.item_attributes)
    q = features.item_counts / max(features.item_counts.sum(), 1)
    log_q = torch.from_numpy(np.log(np.maximum(q, 1e-12)).astype(np.float32))
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    n = len(user_rows)
    steps_per_epoch = max(1, n // config.batch_size)
    losses = []
    model.train()
    with tqdm(
        total=config.epochs * steps_per_epoch, desc="two-tower", unit="batch", mininterval=2
    ) as bar:
        for epoch in range(config.epochs):
            order = rng.permutation(n)
            total = 0.0
            for step in range(steps_per_epoch):
                batch = order[step * config.batch_size : (step + 1) * config.batch_size]
                items = torch.from_numpy(item_rows[batch])
                item_ids_in = items.masked_fill(torch.rand(len(batch)) < config.item_id_dropout, 0)
                user = model.user_from_rows(
                    torch.from_numpy(user_rows[batch]), torch.from_numpy(history[batch])
                )
                item = model.item_tower(item_ids_in, item_attributes[items])
                loss = in_batch_softmax_loss(user, item, items, log_q[items], config.temperature)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                bar.update()
            losses.append(total / steps_per_epoch)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            log.info("two-tower epoch %d/%d loss %.4f", epoch + 1, config.epochs, losses[-1])
    model.eval()
    with torch.no_grad():
        # Items that never occurred (listed in the catalog only) kept their random initial
        # vectors; zero, as id dropout trained for, they are embedded from attributes alone.
        model.item_id.weight[torch.from_numpy(features.item_counts == 0)] = 0.0
    return model, {"train_loss": losses, "config": asdict(config)}


@torch.inference_mode()
def cold_user_vector(model: TwoTower) -> np.ndarray:
    """The user tower's answer for an unknown user id with no history."""
    zeros = torch.zeros(1, model.config.id_dim)
    return model.user_tower(zeros, zeros)[0].numpy()


@torch.inference_mode()
def user_vectors(
    model: TwoTower, features: FeatureSpace, histories, batch_size: int = 8192
) -> np.ndarray:
    """User-tower output for every user of `histories` (UserHistories), from their latest items."""
    length = model.config.history_length
    user_rows = features.users.rows(histories.user_ids)
    history = np.zeros((len(user_rows), length), dtype=np.int64)
    for i, (start, end) in enumerate(zip(histories.offsets[:-1], histories.offsets[1:])):
        latest = features.items.rows(histories.items[max(start, end - length) : end])
        history[i, length - len(latest) :] = latest
    out = [
        model.user_from_rows(
            torch.from_numpy(user_rows[s : s + batch_size]),
            torch.from_numpy(history[s : s + batch_size]),
        )
        for s in range(0, len(user_rows), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.out_dim), np.float32)


@torch.inference_mode()
def item_vectors(model: TwoTower, features: FeatureSpace, batch_size: int = 65536) -> np.ndarray:
    """Item-tower output for every catalog item, rows aligned with `features.items.ids`."""
    rows = torch.arange(1, features.items.size)
    attributes = torch.from_numpy(features.item_attributes)
    out = [
        model.item_tower(rows[s : s + batch_size], attributes[rows[s : s + batch_size]])
        for s in range(0, len(rows), batch_size)
    ]
    return torch.cat(out).numpy()
