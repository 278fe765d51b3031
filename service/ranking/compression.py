"""Post-training low-rank compression of a trained CTR model (DeepFM or DCN-v2).

Output-feature compression (Yu et al., KDD 2024, "Unified Low-rank Compression Framework
for Click-through Rate Prediction"): run the model on calibration rows of the training
split, and for each layer take the mean mu and covariance C of its outputs and the top-r
eigenvectors U_r of C. A dense layer y = W x + b becomes two,
    Linear(U_r^T W, U_r^T b)  then  Linear(U_r, (I - U_r U_r^T) mu),
so y ~ mu + U_r U_r^T (y - mu): what is lost is the output variance outside U_r, not the
largest singular directions of W. An embedding field is compressed the same way, by PCA of
the vectors the calibration rows look up: each row keeps its r-dim code U_r^T (e - mu) and
the field keeps the up-projection U_r and the shift mu, because the FM and cross layers
need the full vector.

Weight SVD is the baseline at the same sizes: W ~ (U_r S_r) V_r^T for dense layers and
E_f ~ (U_r S_r) V_r^T for each field's table, with no calibration data.

Ranks come from a size budget: an embedding rank r_e (each row d -> r_e values), and for a
dense layer of in x out a rank of `dense_keep` x in*out/(in+out), which keeps about that
share of the layer's weights. Layers too small to gain are left alone.
"""

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from service.ranking.ctr import tensors
from service.ranking.embedding import FieldEmbedding, FieldLayout
from service.ranking.fields import EncodedRows

Method = Literal["output_features", "weight_svd"]


@dataclass(frozen=True)
class CompressionConfig:
    embedding_rank: int = 4
    dense_keep: float = 0.3  # share of each compressed dense layer's weights kept


def dense_rank(layer: nn.Linear, keep: float) -> int | None:
    """The rank that keeps about `keep` of the layer's weights; None when two factors of
    that rank would not be smaller than the layer."""
    n_in, n_out = layer.in_features, layer.out_features
    rank = max(1, math.floor(keep * n_in * n_out / (n_in + n_out)))
    return rank if rank * (n_in + n_out) < n_in * n_out else None


def low_rank_pair(down_weight: torch.Tensor, down_bias: torch.Tensor | None, up_weight: torch.Tensor, up_bias: torch.Tensor) -> nn.Sequential:
    """Linear(in -> r) then Linear(r -> out) with the given weights."""
    rank, width = down_weight.shape
    down = nn.Linear(width, rank, bias=down_bias is not None)
    up = nn.Linear(rank, up_weight.shape[0])
    with torch.no_grad():
        down.weight.copy_(down_weight)
        if down_bias is not None:
            down.bias.copy_(down_bias)
        up.weight.copy_(up_weight)
        up.bias.copy_(up_bias)
    return nn.Sequential(down, up)


def top_eigenvectors(outputs: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and the top-`rank` eigenvectors (D, r) of the outputs' covariance."""
    outputs = outputs.double()
    mean = outputs.mean(0)
    centred = outputs - mean
    covariance = centred.T @ centred / max(len(outputs) - 1, 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    return mean, vectors[:, -rank:].flip(1)


def compress_linear_outputs(layer: nn.Linear, outputs: torch.Tensor, rank: int) -> nn.Sequential:
    mean, basis = top_eigenvectors(outputs, rank)
    weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
    residual_mean = mean - basis @ (basis.T @ mean)
    return low_rank_pair((basis.T @ weight).float(), (basis.T @ bias).float(), basis.float(), residual_mean.float())


def svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    u, s, vt = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    return low_rank_pair(vt[:rank].float(), None, (u[:, :rank] * s[:rank]).float(), layer.bias.detach())


def compressible_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every dense layer worth compressing: the MLP's hidden
    layers (not its 1-wide output) and the cross layers' matrices."""
    found = []
    for index, layer in enumerate(model.mlp):
        if isinstance(layer, nn.Linear) and layer.out_features > 1:
            found.append((model.mlp, str(index), layer))
    for cross in getattr(model, "cross", []):
        found.append((cross, "linear", cross.linear))
    return found


def layer_outputs(model: nn.Module, layers: list[nn.Linear], rows: EncodedRows) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The outputs of `layers` and the categorical field vectors on `rows`."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda _m, _i, out, key=i: captured.__setitem__(key, out.detach())) for i, layer in enumerate(layers)]
    model.eval()
    categorical, multi, numeric = tensors(rows)
    try:
        with torch.inference_mode():
            model(categorical, multi, numeric)
            vectors = model.fields.categorical_vectors(categorical + model.fields.offsets)
    finally:
        for hook in hooks:
            hook.remove()
    return [captured[i] for i in range(len(layers))], vectors


def factorised_fields(fields: FieldEmbedding, rank: int, codes: torch.Tensor, up: torch.Tensor, shift: torch.Tensor) -> FieldEmbedding:
    """A factorised copy of a full-table `fields` with the given codes (rows, r), per-field
    up-projections (F, r, d) and shifts (F, d); every other parameter carried over."""
    layout = fields.layout
    compact = FieldEmbedding(FieldLayout(layout.field_sizes, layout.attribute_size, layout.numeric_fields, layout.dim, rank))
    state = {k: v for k, v in fields.state_dict().items() if k != "embedding.weight"}
    state.update({"codes.weight": codes.float(), "up": up.float(), "shift": shift.float()})
    compact.load_state_dict(state)
    return compact


def compress_fields(fields: FieldEmbedding, method: Method, rank: int, looked_up: torch.Tensor | None) -> FieldEmbedding:
    """`looked_up`: (rows, F, d) field vectors of the calibration rows; output features only."""
    table = fields.embedding.weight.detach().double()
    sizes = fields.layout.field_sizes
    codes, ups, shifts, start = [], [], [], 0
    for f, size in enumerate(sizes):
        rows = table[start : start + size]
        if method == "output_features":
            mean, basis = top_eigenvectors(looked_up[:, f], rank)  # PCA of what calibration looks up
            codes.append((rows - mean) @ basis)
            ups.append(basis.T)
            shifts.append(mean)
        else:
            u, s, vt = torch.linalg.svd(rows, full_matrices=False)
            r = min(rank, len(s))
            code = torch.zeros(size, rank, dtype=torch.float64)
            code[:, :r] = u[:, :r] * s[:r]
            up = torch.zeros(rank, rows.shape[1], dtype=torch.float64)
            up[:r] = vt[:r]
            codes.append(code)
            ups.append(up)
            shifts.append(torch.zeros(rows.shape[1], dtype=torch.float64))
        start += size
    return factorised_fields(fields, rank, torch.cat(codes), torch.stack(ups), torch.stack(shifts))


def compress(model: nn.Module, method: Method, config: CompressionConfig, calibration: EncodedRows) -> nn.Module:
    """A compressed copy of a trained full-table DeepFM or DCN-v2. `calibration` rows (from
    the training split) are used by output-feature compression only."""
    if model.fields.layout.rank is not None:
        raise ValueError("the model's tables are factorised already")
    compact = copy.deepcopy(model).eval()
    targets = compressible_layers(compact)
    if method == "output_features":
        outputs, looked_up = layer_outputs(compact, [layer for _, _, layer in targets], calibration)
    else:  # weights alone: no calibration pass
        outputs, looked_up = [None] * len(targets), None
    for (parent, name, layer), output in zip(targets, outputs):
        rank = dense_rank(layer, config.dense_keep)
        if rank is None:
            continue
        replacement = compress_linear_outputs(layer, output, rank) if method == "output_features" else svd_linear(layer, rank)
        setattr(parent, name, replacement)  # a Sequential's children are named "0", "1", ...
    compact.fields = compress_fields(compact.fields, method, config.embedding_rank, looked_up)
    return compact.eval()


def model_bytes(model: nn.Module) -> dict:
    """float32 bytes of the embedding tables (what an embedding store would hold: codes or
    full rows), of everything else, and in total."""
    embeddings = 0
    for name, tensor in model.state_dict().items():
        if name in ("fields.embedding.weight", "fields.codes.weight"):
            embeddings += tensor.numel() * 4
    total = sum(t.numel() * 4 for t in model.state_dict().values())
    return {"embeddings": embeddings, "dense": total - embeddings, "total": total}
