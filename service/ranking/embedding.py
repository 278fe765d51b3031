"""Field vectors shared by the CTR models: every field becomes one d-dim vector, plus a
first-order weight per field.

A categorical field is a lookup in its table (all tables stacked in one, offset per field);
the multi-valued field is the mean of its values' vectors; a numeric field is its value
times a learned vector. With `rank`, the stacked table is factorised end to end: each row
holds an r-dim code and each field an (r x d) up-projection, E_f = A_f B_f (+ a per-field
shift), so the rows an embedding store would hold shrink from d to r values.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FieldLayout:
    field_sizes: tuple[int, ...]  # rows per categorical field, row 0 = default
    attribute_size: int  # rows of the multi-valued field (1: no such field)
    numeric_fields: int
    dim: int = 16
    rank: int | None = None  # factorised tables: r-dim codes per row

    @property
    def n_fields(self) -> int:
        return len(self.field_sizes) + 1 + self.numeric_fields


class FieldEmbedding(nn.Module):
    def __init__(self, layout: FieldLayout, start_from_numeric: int | None = None):
        """`start_from_numeric`: a numeric field whose first-order weight starts at 1, so a
        ranker fed the retrieval logit starts from retrieval order and learns corrections."""
        super().__init__()
        self.layout = layout
        d = layout.dim
        offsets = torch.tensor([0, *layout.field_sizes[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        total = sum(layout.field_sizes)
        if layout.rank is None:
            self.embedding = nn.Embedding(total, d)
            nn.init.normal_(self.embedding.weight, std=0.01)
        else:
            self.codes = nn.Embedding(total, layout.rank)
            self.up = nn.Parameter(torch.empty(len(layout.field_sizes), layout.rank, d))
            # The product keeps about the full table's initial scale (std 0.01).
            nn.init.normal_(self.codes.weight, std=0.1)
            nn.init.normal_(self.up, std=0.1 / layout.rank**0.5)
            # Per-field offset added after the up-projection: zero when trained factorised,
            # the field's mean vector when compressed from a full table by PCA.
            self.register_buffer("shift", torch.zeros(len(layout.field_sizes), d))
        self.linear = nn.Embedding(total, 1)
        nn.init.zeros_(self.linear.weight)
        self.attribute = nn.Embedding(layout.attribute_size, d, padding_idx=0)
        nn.init.normal_(self.attribute.weight, std=0.01)
        with torch.no_grad():
            self.attribute.weight[0].zero_()
        self.attribute_linear = nn.Embedding(layout.attribute_size, 1, padding_idx=0)
        nn.init.zeros_(self.attribute_linear.weight)
        self.numeric = nn.Parameter(torch.randn(layout.numeric_fields, d) * 0.01)
        self.numeric_linear = nn.Parameter(torch.zeros(layout.numeric_fields))
        if start_from_numeric is not None:
            with torch.no_grad():
                self.numeric_linear[start_from_numeric] = 1.0

    def categorical_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, F) stacked-table rows -> (B, F, d)."""
        if self.layout.rank is None:
            return self.embedding(rows)
        return torch.einsum("bfr,frd->bfd", self.codes(rows), self.up) + self.shift

    def forward(
        self, categorical: torch.Tensor, attributes: torch.Tensor, numeric: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """categorical (B, F) rows per field, attributes (B, A) rows 0-padded, numeric (B, N).
        Returns the field vectors (B, n_fields, d) and the first-order term (B,)."""
        rows = categorical + self.offsets
        mask = (attributes > 0).unsqueeze(-1).float()
        present = mask.sum(1).clamp(min=1.0)
        attribute_vector = (self.attribute(attributes) * mask).sum(1) / present
        fields = torch.cat(
            [
                self.categorical_vectors(rows),
                attribute_vector.unsqueeze(1),
                numeric.unsqueeze(-1) * self.numeric,
            ],
            dim=1,
        )
        first_order = (
            self.linear(rows).sum((1, 2))
            + (self.attribute_linear(attributes) * mask).sum((1, 2)) / present.squeeze(-1)
            + numeric @ self.numeric_linear
        )
        return fields, first_order
