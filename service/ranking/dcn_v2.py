"""DCN-v2 (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network"), stacked: a cross
network over the concatenated field vectors, then an MLP.

Cross layer l: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, with a full-rank W_l (D x D); each
layer raises the order of the feature crosses by one. The first-order weights of the field
embedding add a linear term, as in DeepFM, so both models start from the same wide part.
"""

from dataclasses import dataclass

import torch
from torch import nn

from service.ranking.deepfm import mlp
from service.ranking.embedding import FieldEmbedding, FieldLayout


@dataclass(frozen=True)
class DCNv2Config:
    field_sizes: tuple[int, ...]
    attribute_size: int
    numeric_fields: int
    dim: int = 16
    cross_layers: int = 2
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    rank: int | None = None

    @property
    def layout(self) -> FieldLayout:
        return FieldLayout(
            self.field_sizes, self.attribute_size, self.numeric_fields, self.dim, self.rank
        )


class CrossLayer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.linear.weight, std=width**-0.5)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DCNv2(nn.Module):
    def __init__(self, config: DCNv2Config, start_from_numeric: int | None = None):
        super().__init__()
        self.config = config
        self.fields = FieldEmbedding(config.layout, start_from_numeric)
        width = config.layout.n_fields * config.dim
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(config.cross_layers))
        self.mlp = mlp(width, config.hidden, config.dropout)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(
        self, categorical: torch.Tensor, attributes: torch.Tensor, numeric: torch.Tensor
    ) -> torch.Tensor:
        fields, first_order = self.fields(categorical, attributes, numeric)
        x0 = x = fields.flatten(1)
        for layer in self.cross:
            x = layer(x0, x)
        return self.bias + first_order + self.mlp(x).squeeze(-1)
