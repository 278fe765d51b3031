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

Ranks come from a size budget (an embedding rank r_e, each row d -> r_e values, and for a
dense layer of in x out a rank of `dense_keep` x in*out/(in+out), which keeps about that
share of the layer's weights) or from a share of explained variance (the smallest rank whose
top components hold that share of the layer's output variance, or of its squared singular
values for weight SVD; for the embedding, the largest such rank over the fields). Layers too
small to gain are left alone. The `CompressionPlan` (method and ranks) is what a compressed
model's shape needs, so a saved one can be rebuilt and loaded without calibration data.
"""

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from service.ranking.embedding import FieldEmbedding, FieldLayout

Method = Literal["output_features", "weight_svd"]
METHODS: tuple[Method, ...] = ("output_features", "weight_svd")
# What a model takes: categorical rows (B, F), multi-valued rows (B, A), numeric values (B, N).
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CompressionConfig:
    embedding_rank: int = 4
    dense_keep: float = 0.3  # share of each compressed dense layer's weights kept
    explained_variance: float | None = (
        None  # set: ranks by variance kept instead of the size budget
    )

    def __post_init__(self):
        if self.embedding_rank < 1 or not 0 < self.dense_keep <= 1:
            raise ValueError("embedding_rank must be >= 1 and dense_keep in (0, 1]")
        if self.explained_variance is not None and not 0 < self.explained_variance < 1:
            raise ValueError("explained_variance must be in (0, 1)")


@dataclass(frozen=True)
class CompressionPlan:
    """The shape of a compressed model: method, embedding rank, rank of every replaced layer
    (by its qualified name, e.g. "mlp.0" or "cross.1.linear")."""

    method: Method
    embedding_rank: int
    layers: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CompressionPlan":
        if data.get("method") not in METHODS:
            raise ValueError(f"unknown compression method {data.get('method')!r}; one of {METHODS}")
        return cls(
            data["method"],
            int(data["embedding_rank"]),
            {k: int(v) for k, v in data.get("layers", {}).items()},
        )


def saves_weights(layer: nn.Linear, rank: int) -> bool:
    return rank * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features


def dense_rank(layer: nn.Linear, keep: float) -> int | None:
    """The rank that keeps about `keep` of the layer's weights; None when two factors of
    that rank would not be smaller than the layer."""
    n_in, n_out = layer.in_features, layer.out_features
    rank = max(1, math.floor(keep * n_in * n_out / (n_in + n_out)))
    return rank if saves_weights(layer, rank) else None


def variance_rank(spectrum: torch.Tensor, share: float) -> int:
    """The fewest leading components of a descending `spectrum` (eigenvalues, or squared
    singular values) that hold `share` of its sum."""
    total = spectrum.clamp(min=0).sum()
    if total <= 0:
        return 1
    held = spectrum.clamp(min=0).cumsum(0) / total
    return int(torch.searchsorted(held, torch.tensor(share, dtype=held.dtype)).item()) + 1


def low_rank_pair(
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
) -> nn.Sequential:
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


def output_spectrum(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean (D,), eigenvalues (D,) descending and their eigenvectors (D, D) of the outputs' covariance."""
    outputs = outputs.double()
    mean = outputs.mean(0)
    centred = outputs - mean
    covariance = centred.T @ centred / max(len(outputs) - 1, 1)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    return mean, values.flip(0), vectors.flip(1)


def top_eigenvectors(outputs: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and the top-`rank` eigenvectors (D, r) of the outputs' covariance."""
    mean, _, vectors = output_spectrum(outputs)
    return mean, vectors[:, :rank]


def compress_linear_outputs(layer: nn.Linear, outputs: torch.Tensor, rank: int) -> nn.Sequential:
    mean, basis = top_eigenvectors(outputs, rank)
    weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
    residual_mean = mean - basis @ (basis.T @ mean)
    return low_rank_pair(
        (basis.T @ weight).float(), (basis.T @ bias).float(), basis.float(), residual_mean.float()
    )


def svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    u, s, vt = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    return low_rank_pair(
        vt[:rank].float(), None, (u[:, :rank] * s[:rank]).float(), layer.bias.detach()
    )


def compressible_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every dense layer worth compressing, by qualified name: the MLP's hidden layers (not
    its 1-wide output) and the cross layers' matrices."""
    found = {}
    for index, layer in enumerate(model.mlp):
        if isinstance(layer, nn.Linear) and layer.out_features > 1:
            found[f"mlp.{index}"] = layer
    for index, cross in enumerate(getattr(model, "cross", [])):
        found[f"cross.{index}.linear"] = cross.linear
    return found


def replace_layer(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(
        model.get_submodule(parent), attribute, replacement
    )  # a Sequential's children are "0", "1", ...


def layer_outputs(
    model: nn.Module, layers: list[nn.Linear], inputs: Inputs
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The outputs of `layers` and the categorical field vectors on `inputs`."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out, key=i: captured.__setitem__(key, out.detach())
        )
        for i, layer in enumerate(layers)
    ]
    model.eval()
    categorical, multi, numeric = inputs
    try:
        with torch.inference_mode():
            model(categorical, multi, numeric)
            vectors = model.fields.categorical_vectors(categorical + model.fields.offsets)
    finally:
        for hook in hooks:
            hook.remove()
    return [captured[i] for i in range(len(layers))], vectors


def factorised_fields(
    fields: FieldEmbedding, rank: int, codes: torch.Tensor, up: torch.Tensor, shift: torch.Tensor
) -> FieldEmbedding:
    """A factorised copy of a full-table `fields` with the given codes (rows, r), per-field
    up-projections (F, r, d) and shifts (F, d); every other parameter carried over."""
    layout = fields.layout
    compact = FieldEmbedding(
        FieldLayout(
            layout.field_sizes, layout.attribute_size, layout.numeric_fields, layout.dim, rank
        )
    )
    state = {k: v for k, v in fields.state_dict().items() if k != "embedding.weight"}
    state.update({"codes.weight": codes.float(), "up": up.float(), "shift": shift.float()})
    compact.load_state_dict(state)
    return compact


def field_tables(fields: FieldEmbedding) -> list[torch.Tensor]:
    table = fields.embedding.weight.detach().double()
    return list(torch.split(table, list(fields.layout.field_sizes)))


def embedding_rank(
    fields: FieldEmbedding, method: Method, share: float, looked_up: torch.Tensor | None
) -> int:
    """The largest rank any field needs to keep `share` of its variance."""
    ranks = []
    for f, rows in enumerate(field_tables(fields)):
        if method == "output_features":
            spectrum = output_spectrum(looked_up[:, f])[1]
        else:
            spectrum = torch.linalg.svdvals(rows) ** 2
        ranks.append(variance_rank(spectrum, share))
    return min(max(ranks), fields.layout.dim)


def compress_fields(
    fields: FieldEmbedding, method: Method, rank: int, looked_up: torch.Tensor | None
) -> FieldEmbedding:
    """`looked_up`: (rows, F, d) field vectors of the calibration rows; output features only."""
    codes, ups, shifts = [], [], []
    for f, rows in enumerate(field_tables(fields)):
        if method == "output_features":
            mean, basis = top_eigenvectors(
                looked_up[:, f], rank
            )  # PCA of what calibration looks up
            codes.append((rows - mean) @ basis)
            ups.append(basis.T)
            shifts.append(mean)
        else:
            u, s, vt = torch.linalg.svd(rows, full_matrices=False)
            r = min(rank, len(s))
            code = torch.zeros(len(rows), rank, dtype=torch.float64)
            code[:, :r] = u[:, :r] * s[:r]
            up = torch.zeros(rank, rows.shape[1], dtype=torch.float64)
            up[:r] = vt[:r]
            codes.append(code)
            ups.append(up)
            shifts.append(torch.zeros(rows.shape[1], dtype=torch.float64))
    return factorised_fields(fields, rank, torch.cat(codes), torch.stack(ups), torch.stack(shifts))


def layer_rank(
    layer: nn.Linear, method: Method, config: CompressionConfig, outputs: torch.Tensor | None
) -> int | None:
    if config.explained_variance is None:
        return dense_rank(layer, config.dense_keep)
    if method == "output_features":
        spectrum = output_spectrum(outputs)[1]
    else:
        spectrum = torch.linalg.svdvals(layer.weight.detach().double()) ** 2
    rank = variance_rank(spectrum, config.explained_variance)
    return rank if saves_weights(layer, rank) else None


def compress(
    model: nn.Module, method: Method, config: CompressionConfig, calibration: Inputs
) -> tuple[nn.Module, CompressionPlan]:
    """A compressed copy of a trained full-table DeepFM or DCN-v2, and its plan.
    `calibration` inputs (rows of the training split) are used by output-feature
    compression only."""
    if model.fields.layout.rank is not None:
        raise ValueError("the model's tables are factorised already")
    compact = copy.deepcopy(model).eval()
    targets = compressible_layers(compact)
    if method == "output_features":
        outputs, looked_up = layer_outputs(compact, list(targets.values()), calibration)
    else:  # weights alone: no calibration pass
        outputs, looked_up = [None] * len(targets), None
    ranks = {}
    for (name, layer), output in zip(targets.items(), outputs):
        rank = layer_rank(layer, method, config, output)
        if rank is None:
            continue
        ranks[name] = rank
        replace_layer(
            compact,
            name,
            compress_linear_outputs(layer, output, rank)
            if method == "output_features"
            else svd_linear(layer, rank),
        )
    if config.explained_variance is None:
        rank = config.embedding_rank
    else:
        rank = embedding_rank(compact.fields, method, config.explained_variance, looked_up)
    compact.fields = compress_fields(compact.fields, method, rank, looked_up)
    return compact.eval(), CompressionPlan(method, rank, ranks)


def compressed_shape(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """`model` (a freshly built full-table one) rebuilt in the shape `plan` describes, ready
    for the compressed weights' `load_state_dict`."""
    layers = compressible_layers(model)
    unknown = sorted(set(plan.layers) - set(layers))
    if unknown:
        raise ValueError(f"the compression plan names layers the model lacks: {unknown}")
    for name, rank in plan.layers.items():
        layer = layers[name]
        down = nn.Linear(layer.in_features, rank, bias=plan.method == "output_features")
        replace_layer(model, name, nn.Sequential(down, nn.Linear(rank, layer.out_features)))
    layout = model.fields.layout
    model.fields = FieldEmbedding(
        FieldLayout(
            layout.field_sizes,
            layout.attribute_size,
            layout.numeric_fields,
            layout.dim,
            plan.embedding_rank,
        )
    )
    return model


def model_bytes(model: nn.Module) -> dict:
    """float32 bytes of the embedding tables (what an embedding store would hold: codes or
    full rows), of everything else, and in total."""
    embeddings = 0
    for name, tensor in model.state_dict().items():
        if name in ("fields.embedding.weight", "fields.codes.weight"):
            embeddings += tensor.numel() * 4
    total = sum(t.numel() * 4 for t in model.state_dict().values())
    return {"embeddings": embeddings, "dense": total - embeddings, "total": total}
