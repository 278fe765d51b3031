"""The ranker's forward pass in numpy, for serving: DeepFM and DCN-v2, full, factorised or
low-rank compressed, in evaluation mode (dropout off).

A request ranks a few hundred rows in one thread; at that size torch's per-operation
dispatch (about 40 operators a pass, several microseconds each, plus module calls) costs as
much as the arithmetic, while a numpy operation costs a microsecond or two around the same
BLAS work. The weights are copied once at load; `RankerKernel.of` declines a model holding
a layer it does not know, which then serves through torch. `bench/ranker_runtime.py`
measures both on the artifact's variants and the largest difference in scores;
tests/test_ranker_kernel.py holds the kernel to torch within 1e-5.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from service.ranking.dcn_v2 import DCNv2
from service.ranking.deepfm import DeepFM
from service.ranking.embedding import FieldEmbedding
from service.ranking.encoder import RankingBatch

Layer = Callable[[np.ndarray], np.ndarray]


class UnsupportedLayer(Exception):
    """A module the kernel has no numpy form of."""


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32, copy=True)


def _linear(layer: nn.Linear) -> Layer:
    weight = np.ascontiguousarray(_array(layer.weight).T)
    bias = _array(layer.bias) if layer.bias is not None else None
    if bias is None:
        return lambda x: x @ weight
    return lambda x: x @ weight + bias


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, out=x)


def _layers(module: nn.Module) -> list[Layer]:
    """The module as a list of numpy steps (a compressed layer is a Sequential of two)."""
    if isinstance(module, nn.Linear):
        return [_linear(module)]
    if isinstance(module, nn.ReLU):
        return [_relu]
    if isinstance(module, nn.Dropout):  # evaluation mode: the identity
        return []
    if isinstance(module, nn.Sequential):
        return [step for child in module for step in _layers(child)]
    raise UnsupportedLayer(type(module).__name__)


def _chain(module: nn.Module) -> Layer:
    steps = _layers(module)

    def run(x: np.ndarray) -> np.ndarray:
        for step in steps:
            x = step(x)
        return x

    return run


class _Fields:
    """`FieldEmbedding.forward` in numpy: field vectors (B, n_fields, d), first-order (B,)."""

    def __init__(self, fields: FieldEmbedding):
        layout = fields.layout
        self.offsets = fields.offsets.numpy().astype(np.int64)
        if layout.rank is None:
            self.table, self.codes = _array(fields.embedding.weight), None
        else:
            self.table, self.codes = None, _array(fields.codes.weight)
            self.up, self.shift = _array(fields.up), _array(fields.shift)  # (F, r, d), (F, d)
        self.linear = _array(fields.linear.weight)[:, 0]
        self.attribute = _array(fields.attribute.weight)
        self.attribute_linear = _array(fields.attribute_linear.weight)[:, 0]
        self.numeric = _array(fields.numeric)  # (N, d)
        self.numeric_linear = _array(fields.numeric_linear)  # (N,)

    def categorical_vectors(self, rows: np.ndarray) -> np.ndarray:
        if self.codes is None:
            return self.table[rows]
        codes = self.codes[rows].transpose(1, 0, 2)  # (F, B, r)
        return (codes @ self.up).transpose(1, 0, 2) + self.shift  # (B, F, d)

    def __call__(
        self, categorical: np.ndarray, attributes: np.ndarray, numeric: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = categorical + self.offsets
        # Items hold a few attribute values in a wide zero-padded row: read the used columns.
        used = np.flatnonzero((attributes > 0).any(0))
        attributes = attributes[:, : used[-1] + 1] if len(used) else attributes[:, :1]
        mask = (attributes > 0).astype(np.float32)
        present = np.maximum(mask.sum(1), 1.0)
        attribute_vector = np.matmul(mask[:, None, :], self.attribute[attributes])[:, 0]
        attribute_vector /= present[:, None]
        fields = np.concatenate(
            [
                self.categorical_vectors(rows),
                attribute_vector[:, None, :],
                numeric[:, :, None] * self.numeric,
            ],
            axis=1,
        )
        first_order = (
            self.linear[rows].sum(1)
            + (self.attribute_linear[attributes] * mask).sum(1) / present
            + numeric @ self.numeric_linear
        )
        return fields, first_order


class RankerKernel:
    def __init__(self, model: nn.Module):
        """Raises `UnsupportedLayer` for a model it cannot copy (`of` returns None then)."""
        self.fields = _Fields(model.fields)
        self.bias = float(model.bias.detach()[0])
        self.mlp = _chain(model.mlp)
        self.deepfm = isinstance(model, DeepFM)
        layout = model.fields.layout
        self.field_sum = np.tile(np.eye(layout.dim, dtype=np.float32), (layout.n_fields, 1))
        if not self.deepfm and not isinstance(model, DCNv2):
            raise UnsupportedLayer(type(model).__name__)
        self.cross = [] if self.deepfm else [_chain(layer.linear) for layer in model.cross]

    @classmethod
    def of(cls, model: nn.Module) -> "RankerKernel | None":
        try:
            return cls(model)
        except UnsupportedLayer:
            return None

    def logits(self, categorical: np.ndarray, attributes: np.ndarray, numeric: np.ndarray):
        fields, first_order = self.fields(categorical, attributes, numeric)
        flat = fields.reshape(len(fields), -1)
        if self.deepfm:
            # FM: half of |sum of the field vectors|^2 minus the sum of their |v|^2; the sum
            # over fields as one product with stacked identities (a strided sum is slower).
            summed = flat @ self.field_sum
            fm = 0.5 * (np.einsum("ij,ij->i", summed, summed) - np.einsum("ij,ij->i", flat, flat))
            deep = self.mlp(flat)[:, 0]
            return self.bias + first_order + fm + deep
        x = flat
        for cross in self.cross:
            x = flat * cross(x) + x
        return self.bias + first_order + self.mlp(x)[:, 0]

    def __call__(self, batch: RankingBatch) -> np.ndarray:
        """Scores (float32) of the batch's rows: sigmoid of the logits, as the torch path."""
        logits = self.logits(
            batch.categorical.numpy(), batch.attributes.numpy(), batch.numeric.numpy()
        )
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
