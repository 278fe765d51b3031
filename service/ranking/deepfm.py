"""DeepFM (Guo et al. 2017) over categorical, multi-valued and numeric fields.

Every field becomes one d-dim vector: a categorical field by lookup, the item-attribute
field as the mean of its values' vectors, a numeric field as value x a learned vector.
The FM term takes pairwise dot products of the field vectors; the deep part is an MLP over
their concatenation; first-order weights add a linear term.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DeepFMConfig:
    field_sizes: tuple[int, ...]  # rows per categorical field, row 0 = unknown
    attribute_size: int  # rows of the multi-valued attribute field
    numeric_fields: int
    dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1


class DeepFM(nn.Module):
    def __init__(self, config: DeepFMConfig, start_from_numeric: int | None = None):
        """`start_from_numeric`: a numeric field whose first-order weight starts at 1, so a
        ranker fed the retrieval logit starts from retrieval order and learns corrections."""
        super().__init__()
        self.config = config
        offsets = torch.tensor([0, *config.field_sizes[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        total = sum(config.field_sizes)
        self.embedding = nn.Embedding(total, config.dim)
        self.linear = nn.Embedding(total, 1)
        self.attribute = nn.Embedding(config.attribute_size, config.dim, padding_idx=0)
        self.attribute_linear = nn.Embedding(config.attribute_size, 1, padding_idx=0)
        self.numeric = nn.Parameter(torch.randn(config.numeric_fields, config.dim) * 0.01)
        self.numeric_linear = nn.Parameter(torch.zeros(config.numeric_fields))
        if start_from_numeric is not None:
            with torch.no_grad():
                self.numeric_linear[start_from_numeric] = 1.0
        self.bias = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.zeros_(self.linear.weight)
        nn.init.normal_(self.attribute.weight, std=0.01)
        nn.init.zeros_(self.attribute_linear.weight)
        n_fields = len(config.field_sizes) + 1 + config.numeric_fields
        layers: list[nn.Module] = []
        width = n_fields * config.dim
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, categorical: torch.Tensor, attributes: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        """categorical (B, F) rows per field, attributes (B, A) rows 0-padded, numeric (B, N).
        Returns logits (B,)."""
        rows = categorical + self.offsets
        mask = (attributes > 0).unsqueeze(-1).float()
        attribute_vector = (self.attribute(attributes) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        fields = torch.cat(
            [
                self.embedding(rows),
                attribute_vector.unsqueeze(1),
                numeric.unsqueeze(-1) * self.numeric,
            ],
            dim=1,
        )  # (B, n_fields, d)
        first_order = (
            self.linear(rows).sum((1, 2))
            + (self.attribute_linear(attributes) * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1.0)
            + numeric @ self.numeric_linear
        )
        summed = fields.sum(1)
        fm = 0.5 * (summed.pow(2) - fields.pow(2).sum(1)).sum(1)
        deep = self.mlp(fields.flatten(1)).squeeze(-1)
        return self.bias + first_order + fm + deep
