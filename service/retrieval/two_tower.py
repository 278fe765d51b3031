"""Two-tower retrieval model (Yi et al. 2019): in-batch softmax with logQ correction.

User tower: user-id vector and a state of the user's latest item-id vectors, either their
mean or causal self-attention over them in time order (SASRec-style, trained with every
position of a history as a target under the same loss). Item tower:
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
    sequence_epochs: int = 30  # the sequence tower's: attention layers take longer to fit
    batch_size: int = 1024
    learning_rate: float = 3e-3
    weight_decay: float = 1e-6
    item_id_dropout: float = 0.1  # teaches the item tower to embed items from attributes alone
    # Teaches the user tower to answer from the latest items alone: users the table does not
    # hold yet and visitors served from their session items (a zero user row).
    user_id_dropout: float = 0.0
    user_tower: str = "mean"  # "mean" of the latest items, or causal self-attention over them
    sequence_blocks: int = 2
    sequence_heads: int = 1
    sequence_dropout: float = 0.2
    sequence_batch: int = 64  # histories per step: every position of each is a target
    seed: int = 0


USER_TOWERS = ("mean", "sequence")


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class MeanHistory(nn.Module):
    """The mean of the history's item vectors: order-free, the classic two-tower pooling."""

    def forward(self, vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return masked_mean(vectors, valid)


class CausalBlock(nn.Module):
    """A pre-norm transformer block with causal self-attention (SASRec, Kang & McAuley 2018)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.feed_norm = nn.LayerNorm(dim)
        self.feed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """`attend` [B, L, L]: which keys each query may see."""
        batch, length, dim = x.shape
        q, k, v = (
            part.reshape(batch, length, self.heads, dim // self.heads).transpose(1, 2)
            for part in self.qkv(self.attention_norm(x)).chunk(3, -1)
        )
        scores = (q @ k.transpose(-1, -2)) / (dim // self.heads) ** 0.5
        weights = self.dropout(scores.masked_fill(~attend[:, None], float("-inf")).softmax(-1))
        attended = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.dropout(self.attention_out(attended))
        return x + self.dropout(self.feed(self.feed_norm(x)))


class SequenceHistory(nn.Module):
    """Causal self-attention over the history's item vectors in time order, with learned
    positions counted back from the latest item: the output at the latest position is the
    user's state after their last click, so it moves with every click."""

    def __init__(self, config: "TwoTowerConfig"):
        super().__init__()
        d = config.id_dim
        self.position = nn.Embedding(config.history_length, d)
        nn.init.normal_(self.position.weight, std=0.05)
        self.blocks = nn.ModuleList(
            CausalBlock(d, config.sequence_heads, config.hidden, config.sequence_dropout)
            for _ in range(config.sequence_blocks)
        )
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.sequence_dropout)

    def every_position(self, vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, L, d]: the state after each position. Histories are left-padded (the latest
        item last); invalid positions (padding, rows the table lacks) are zero and hidden
        from every query but their own, so a query always sees at least one key."""
        length = vectors.shape[1]
        x = vectors * valid.unsqueeze(-1) + self.position.weight[-length:]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        attend = causal & (valid.unsqueeze(1) | torch.eye(length, dtype=torch.bool))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, attend)
        return self.norm(x)

    def forward(self, vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.every_position(vectors, valid)[:, -1]


def masked_mean(vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    mask = valid.unsqueeze(-1).to(vectors.dtype)
    return (vectors * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TwoTower(nn.Module):
    def __init__(self, config: TwoTowerConfig, n_users: int, n_items: int, n_attributes: int):
        super().__init__()
        if config.user_tower not in USER_TOWERS:
            raise ValueError(f"user_tower must be one of {USER_TOWERS}, not {config.user_tower!r}")
        self.config = config
        d = config.id_dim
        self.user_id = nn.Embedding(n_users, d, padding_idx=0)
        self.item_id = nn.Embedding(n_items, d, padding_idx=0)
        self.attribute = nn.Embedding(n_attributes, d, padding_idx=0)
        for table in (self.user_id, self.item_id, self.attribute):
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0].zero_()
        self.history = SequenceHistory(config) if config.user_tower == "sequence" else MeanHistory()
        self.user_mlp = _mlp(2 * d, config.hidden, config.out_dim)
        self.item_mlp = _mlp(2 * d, config.hidden, config.out_dim)

    def user_tower(
        self, user_vectors: torch.Tensor, history: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """From vectors as the embedding table holds them: the user's row [B, d] and the
        rows of their latest items [B, L, d], oldest first, `valid` [B, L] where a row
        exists. What serving and online updates call."""
        return self.user_output(user_vectors, self.history(history, valid))

    def user_output(self, user_vectors: torch.Tensor, history_state: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.user_mlp(torch.cat([user_vectors, history_state], -1)), dim=-1)

    def item_tower(self, item_rows: torch.Tensor, attribute_rows: torch.Tensor) -> torch.Tensor:
        return self.item_tower_from_vectors(self.item_id(item_rows), attribute_rows)

    def item_tower_from_vectors(
        self, item_vectors: torch.Tensor, attribute_rows: torch.Tensor
    ) -> torch.Tensor:
        """From item-id vectors as the embedding table holds them: what online updates call."""
        attributes = masked_mean(self.attribute(attribute_rows), attribute_rows > 0)
        return F.normalize(self.item_mlp(torch.cat([item_vectors, attributes], -1)), dim=-1)

    def user_from_rows(self, user_rows: torch.Tensor, history_rows: torch.Tensor) -> torch.Tensor:
        """`history_rows` [B, L]: left-padded with 0, the latest item last."""
        return self.user_tower(
            self.user_id(user_rows), self.item_id(history_rows), history_rows > 0
        )


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy().astype(np.float32).copy()


def _normalised(x: np.ndarray, eps: np.float32) -> np.ndarray:
    """LayerNorm without its affine part (folded into the next layer's weights)."""
    centred = x - np.add.reduce(x, axis=-1, keepdims=True) * np.float32(1.0 / x.shape[-1])
    variance = np.add.reduce(centred * centred, axis=-1, keepdims=True) * np.float32(
        1.0 / x.shape[-1]
    )
    return centred / np.sqrt(variance + eps)


def _folded(norm: nn.LayerNorm, linear: nn.Linear, scale: np.ndarray | None = None):
    """(weight, bias) of `linear` applied after `norm`'s affine: (x̂·γ + β)W + b = x̂(γW) + (βW + b);
    `scale` multiplies output columns (the attention's 1/sqrt(d) on the queries)."""
    gamma, beta = _array(norm.weight), _array(norm.bias)
    weight, bias = _array(linear.weight).T, _array(linear.bias)
    folded_weight, folded_bias = gamma[:, None] * weight, beta @ weight + bias
    if scale is not None:
        folded_weight, folded_bias = folded_weight * scale, folded_bias * scale
    return np.ascontiguousarray(folded_weight, np.float32), folded_bias.astype(np.float32)


class _SequenceKernel:
    """`SequenceHistory` in numpy, for the latest position only, with each LayerNorm's
    affine and the attention scale folded into the weights after it."""

    def __init__(self, history: SequenceHistory):
        self.position = _array(history.position.weight)
        self.eps = np.float32(history.norm.eps)
        self.final = (_array(history.norm.weight), _array(history.norm.bias))
        self.blocks = []
        for block in history.blocks:
            dim = block.qkv.in_features
            scale = np.ones(3 * dim, np.float32)
            scale[:dim] = (dim // block.heads) ** -0.5
            w_qkv, b_qkv = _folded(block.attention_norm, block.qkv, scale)
            w_ff1, b_ff1 = _folded(block.feed_norm, block.feed[0])
            self.blocks.append(
                {
                    "heads": block.heads,
                    "w_qkv": w_qkv,
                    "b_qkv": b_qkv,
                    "w_out": _array(block.attention_out.weight).T.copy(),
                    "b_out": _array(block.attention_out.bias),
                    "w_ff1": w_ff1,
                    "b_ff1": b_ff1,
                    "w_ff2": _array(block.feed[2].weight).T.copy(),
                    "b_ff2": _array(block.feed[2].bias),
                }
            )
        self._causal: dict[int, np.ndarray] = {}

    def _causal_bias(self, length: int) -> np.ndarray:
        """0 where a query may see a key (itself and earlier), -inf after: made once per length."""
        bias = self._causal.get(length)
        if bias is None:
            bias = np.where(np.tri(length, dtype=bool), 0.0, -np.inf).astype(np.float32)
            self._causal[length] = bias
        return bias

    def __call__(self, vectors: np.ndarray, valid: np.ndarray) -> np.ndarray:
        batch, length, dim = vectors.shape
        if length == 0:  # no history: one invalid position, as a left-padded one
            vectors = np.zeros((batch, 1, dim), np.float32)
            valid, length = np.zeros((batch, 1), bool), 1
        bias = self._causal_bias(length)[None]  # [1, L, L]
        if valid.all():
            x = vectors + self.position[-length:]
        else:
            x = vectors * valid[..., None] + self.position[-length:]
            hidden = ~valid[:, None, :] & ~np.eye(length, dtype=bool)  # keys a query may not see
            bias = np.where(hidden, -np.inf, bias).astype(np.float32)
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1  # its keys need every position, its queries one
            x = self._block(x, bias[:, -1:] if last else bias, block, last)
        weight, shift = self.final
        return _normalised(x[:, -1], self.eps) * weight + shift

    def _block(self, x: np.ndarray, bias: np.ndarray, block: dict, last: bool) -> np.ndarray:
        batch, length, dim = x.shape
        heads = block["heads"]
        qkv = _normalised(x, self.eps) @ block["w_qkv"] + block["b_qkv"]
        q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
        if last:
            q, x = q[:, -1:], x[:, -1:]
        queries = q.shape[1]
        if heads > 1:
            q, k, v = (
                part.reshape(batch, -1, heads, dim // heads).transpose(0, 2, 1, 3)
                for part in (q, k, v)
            )
            scores = q @ k.transpose(0, 1, 3, 2) + bias[:, None]
        else:
            scores = q @ k.transpose(0, 2, 1) + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True)) @ v
        if heads > 1:
            attended = attended.transpose(0, 2, 1, 3).reshape(batch, queries, dim)
        x = x + attended @ block["w_out"] + block["b_out"]
        hidden = np.maximum(_normalised(x, self.eps) @ block["w_ff1"] + block["b_ff1"], 0.0)
        return x + hidden @ block["w_ff2"] + block["b_ff2"]


def _mean_kernel(vectors: np.ndarray, valid: np.ndarray) -> np.ndarray:
    if vectors.shape[1] == 0:
        return np.zeros((vectors.shape[0], vectors.shape[2]), np.float32)
    if valid.all():
        return vectors.mean(1)
    counts = np.maximum(valid.sum(1, keepdims=True), 1)
    return (vectors * valid[..., None]).sum(1) / counts


class UserTowerKernel:
    """The user tower as numpy arrays, for serving one request: torch's per-operation
    dispatch costs about 0.1 ms at batch size 1, a numpy pass a fraction of that. The
    layers do not change after training (online updates move id vectors only), so the
    copy stays exact; `TwoTower.user_tower` is the reference it is tested against."""

    def __init__(self, model: TwoTower):
        first, last = model.user_mlp[0], model.user_mlp[2]
        weight = _array(first.weight).T
        d = model.config.id_dim
        # Two halves of the first layer instead of concatenating the inputs per request.
        self.w_user, self.w_history = weight[:d].copy(), weight[d:].copy()
        self.b_first = _array(first.bias)
        self.w_last = _array(last.weight).T.copy()
        self.b_last = _array(last.bias)
        history = model.history
        self.history = (
            _SequenceKernel(history) if isinstance(history, SequenceHistory) else _mean_kernel
        )

    def __call__(
        self, user_vectors: np.ndarray, history: np.ndarray, valid: np.ndarray
    ) -> np.ndarray:
        """`user_vectors` [B, d]; `history` [B, L, d] oldest first, `valid` [B, L]."""
        state = self.history(history, valid)
        hidden = np.maximum(user_vectors @ self.w_user + state @ self.w_history + self.b_first, 0.0)
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


def sequence_windows(
    interactions: pd.DataFrame, features: FeatureSpace, length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's interactions cut into windows of `length` for causal training, every
    interaction but a user's first a target exactly once: user rows [W], input item rows
    [W, L] (left-padded with 0) and target rows [W, L] (0 where a slot is not a target).
    The cuts start at a random offset, so from epoch to epoch a target sees a different
    amount of context. Interactions must be sorted by user, time."""
    user_rows = features.users.rows(interactions["user_id"].to_numpy())
    item_rows = features.items.rows(interactions["item_id"].to_numpy())
    starts = np.flatnonzero(np.r_[True, user_rows[1:] != user_rows[:-1]])
    stops = np.r_[starts[1:], len(user_rows)]
    ends, firsts, owners = [], [], []
    for start, stop in zip(starts.tolist(), stops.tolist()):
        last = stop - 1
        if last <= start:
            continue
        cuts = np.arange(last - int(rng.integers(length)), start, -length)[::-1].tolist()
        if not cuts or cuts[-1] != last:
            cuts.append(last)
        previous = start
        for cut in cuts:
            ends.append(cut)
            firsts.append(previous + 1)
            owners.append(start)
            previous = cut
    ends, firsts, owners = (np.asarray(a, dtype=np.int64) for a in (ends, firsts, owners))
    slots = ends[:, None] - (length - 1) + np.arange(length)  # the target index of each slot
    inputs = np.where(slots - 1 >= owners[:, None], item_rows[np.maximum(slots - 1, 0)], 0)
    targets = np.where(slots >= firsts[:, None], item_rows[np.maximum(slots, 0)], 0)
    return user_rows[owners], inputs, targets


def without_some(rows: torch.Tensor, share: float) -> torch.Tensor:
    """`rows` with each set to 0 (the zero padding row) with probability `share`; no draw
    at all at 0, so a configuration without dropout trains exactly as before it existed."""
    if share <= 0.0:
        return rows
    return rows.masked_fill(torch.rand(rows.shape) < share, 0)


def _interaction_batches(model, interactions, features, config, rng):
    """The mean tower's batches: interactions, each with the items before it."""
    user_rows, item_rows, history = history_before(interactions, features, config.history_length)
    steps = max(1, len(user_rows) // config.batch_size)

    def epoch():
        order = rng.permutation(len(user_rows))
        for step in range(steps):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            users = model.user_from_rows(
                without_some(torch.from_numpy(user_rows[batch]), config.user_id_dropout),
                torch.from_numpy(history[batch]),
            )
            yield users, torch.from_numpy(item_rows[batch])

    return steps, epoch


def _sequence_batches(model, interactions, features, config, rng):
    """The sequence tower's batches: windows of histories, every position a target."""
    windows = len(sequence_windows(interactions, features, config.history_length, rng)[0])
    steps = max(1, -(-windows // config.sequence_batch))

    def epoch():
        user_rows, inputs, targets = sequence_windows(
            interactions, features, config.history_length, rng
        )
        order = rng.permutation(len(user_rows))
        for step in range(-(-len(order) // config.sequence_batch)):
            batch = order[step * config.sequence_batch : (step + 1) * config.sequence_batch]
            batch_inputs = torch.from_numpy(inputs[batch])
            batch_targets = torch.from_numpy(targets[batch])
            states = model.history.every_position(model.item_id(batch_inputs), batch_inputs > 0)
            at = batch_targets > 0
            owners = torch.from_numpy(user_rows[batch]).unsqueeze(1).expand_as(batch_targets)
            owners = without_some(owners[at], config.user_id_dropout)
            yield model.user_output(model.user_id(owners), states[at]), batch_targets[at]

    return steps, epoch


def train_two_tower(
    interactions: pd.DataFrame, features: FeatureSpace, config: TwoTowerConfig
) -> tuple[TwoTower, dict]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = TwoTower(config, features.users.size, features.items.size, features.attribute_size)
    item_attributes = torch.from_numpy(features.item_attributes)
    q = features.item_counts / max(features.item_counts.sum(), 1)
    log_q = torch.from_numpy(np.log(np.maximum(q, 1e-12)).astype(np.float32))
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    batches = _sequence_batches if config.user_tower == "sequence" else _interaction_batches
    steps_per_epoch, epoch_batches = batches(model, interactions, features, config, rng)
    losses = []
    model.train()
    epochs = config.sequence_epochs if config.user_tower == "sequence" else config.epochs
    with tqdm(
        total=epochs * steps_per_epoch,
        desc=f"two-tower ({config.user_tower})",
        unit="batch",
        mininterval=2,
    ) as bar:
        for epoch in range(epochs):
            total, steps = 0.0, 0
            for user, items in epoch_batches():
                item_ids_in = items.masked_fill(torch.rand(len(items)) < config.item_id_dropout, 0)
                item = model.item_tower(item_ids_in, item_attributes[items])
                loss = in_batch_softmax_loss(user, item, items, log_q[items], config.temperature)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
                bar.update()
            losses.append(total / max(steps, 1))
            bar.total = bar.n + (epochs - epoch - 1) * steps  # windows vary a little by epoch
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            log.info("two-tower epoch %d/%d loss %.4f", epoch + 1, epochs, losses[-1])
    model.eval()
    with torch.no_grad():
        # Items that never occurred (listed in the catalog only) kept their random initial
        # vectors; zero, as id dropout trained for, they are embedded from attributes alone.
        model.item_id.weight[torch.from_numpy(features.item_counts == 0)] = 0.0
    return model, {"train_loss": losses, "config": asdict(config)}


@torch.inference_mode()
def cold_user_vector(model: TwoTower) -> np.ndarray:
    """The user tower's answer for an unknown user id with no history."""
    d = model.config.id_dim
    return model.user_tower(
        torch.zeros(1, d), torch.zeros(1, 1, d), torch.zeros(1, 1, dtype=torch.bool)
    )[0].numpy()


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
