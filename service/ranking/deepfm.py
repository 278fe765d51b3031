"""DeepFM (Guo et al. 2017) over categorical, multi-valued and numeric fields.

The field vectors (`FieldEmbedding`) feed an FM term (pairwise dot products of the field
vectors) and a deep part (an MLP over their concatenation); first-order weights add a
linear term.
"""

from dataclasses import dataclass

import torch
from torch import nn

from service.ranking.embedding import FieldEmbedding, FieldLayout


@dataclass(frozen=True)
class DeepFMConfig:
    field_sizes: tuple[int, ...]  # rows per categorical field, row 0 = unknown
    attribute_size: int  # rows of the multi-valued attribute field
    numeric_fields: int
    dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    rank: int | None = None  # factorised embedding tables (r-dim codes)

    @property
    def layout(self) -> FieldLayout:
        return FieldLayout(
            self.field_sizes, self.attribute_size, self.numeric_fields, self.dim, self.rank
        )


def mlp(width: int, hidden: tuple[int, ...], dropout: float, out: int | None = 1) -> nn.Sequential:
    """Linear-ReLU-Dropout blocks, then a linear output layer when `out` is given."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    if out is not None:
        layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class DeepFM(nn.Module):
    def __init__(self, config: DeepFMConfig, start_from_numeric: int | None = None):
        super().__init__()
        self.config = config
        self.fields = FieldEmbedding(config.layout, start_from_numeric)
        self.bias = nn.Parameter(torch.zeros(1))
        self.mlp = mlp(config.layout.n_fields * config.dim, config.hidden, config.dropout)

    def forward(
        self, categorical: torch.Tensor, attributes: torch.Tensor, numeric: torch.Tensor
    ) -> torch.Tensor:
        """categorical (B, F) rows per field, attributes (B, A) rows 0-padded, numeric (B, N).
        Returns logits (B,)."""
        fields, first_order = self.fields(categorical, attributes, numeric)  # (B, n_fields, d)
        summed = fields.sum(1)
        fm = 0.5 * (summed.pow(2) - fields.pow(2).sum(1)).sum(1)
        deep = self.mlp(fields.flatten(1)).squeeze(-1)
        return self.bias + first_order + fm + deep
