"""The ranker's numpy forward (`service.ranking.kernel`) scores as the torch model does."""

import numpy as np
import pytest
import torch
from torch import nn

from service.ranking.compression import CompressionConfig, compress
from service.ranking.dcn_v2 import DCNv2, DCNv2Config
from service.ranking.deepfm import DeepFM, DeepFMConfig
from service.ranking.encoder import RankingBatch
from service.ranking.kernel import RankerKernel
from service.ranking.ranker import Ranker

SIZES = {"field_sizes": (50, 80, 25, 8), "attribute_size": 12, "numeric_fields": 3, "dim": 8}


def trained_like(model: nn.Module) -> nn.Module:
    """Weights of a trained model's scale (the initial ones are mostly zero or tiny)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
        model.fields.attribute.weight[0].zero_()  # the padding row, as training keeps it
    return model.eval()


def inputs(rows: int, seed: int = 0) -> RankingBatch:
    rng = np.random.default_rng(seed)
    categorical = np.stack([rng.integers(0, n, rows) for n in SIZES["field_sizes"]], 1)
    attributes = rng.integers(1, SIZES["attribute_size"], (rows, 6))
    attributes[:, 3:] = 0  # zero-padded: at most three values per item
    attributes[: rows // 4] = 0  # items without any
    numeric = rng.normal(0, 1, (rows, SIZES["numeric_fields"])).astype(np.float32)
    return RankingBatch(
        torch.from_numpy(categorical), torch.from_numpy(attributes), torch.from_numpy(numeric)
    )


def models() -> dict[str, nn.Module]:
    deepfm = trained_like(DeepFM(DeepFMConfig(**SIZES, hidden=(32, 16))))
    dcn = trained_like(DCNv2(DCNv2Config(**SIZES, hidden=(32, 16), cross_layers=2)))
    calibration = inputs(512, seed=5)
    found = {
        "deepfm": deepfm,
        "dcn_v2": dcn,
        "deepfm-factorised": trained_like(DeepFM(DeepFMConfig(**SIZES, hidden=(32,), rank=3))),
        "dcn_v2-factorised": trained_like(DCNv2(DCNv2Config(**SIZES, hidden=(32,), rank=3))),
    }
    for name, model in (("deepfm", deepfm), ("dcn_v2", dcn)):
        for method in ("output_features", "weight_svd"):
            compact, _ = compress(
                model,
                method,
                CompressionConfig(embedding_rank=3, dense_keep=0.3),
                (calibration.categorical, calibration.attributes, calibration.numeric),
            )
            found[f"{name}-{method}"] = compact
    return found


MODELS = models()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("rows", [1, 200, 1024])
def test_the_numpy_kernel_scores_as_torch_within_1e_5(name, rows):
    model = MODELS[name]
    batch = inputs(rows)
    with torch.inference_mode():
        expected = torch.sigmoid(model(batch.categorical, batch.attributes, batch.numeric))
    got = RankerKernel(model)(batch)
    assert got.dtype == np.float32 and got.shape == (rows,)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)
    assert got.std() > 0.01 or rows == 1  # the scores spread: the comparison has teeth


def test_a_model_with_a_layer_the_kernel_lacks_serves_through_torch(bundle):
    model = trained_like(DeepFM(DeepFMConfig(**SIZES, hidden=(16,))))
    assert RankerKernel.of(model) is not None
    model.mlp.insert(1, nn.LayerNorm(16))
    assert RankerKernel.of(model) is None
    ranker = Ranker(bundle.ranker, bundle.features, 20.0)
    assert ranker.runtime == "numpy"
    torch_ranker = Ranker(bundle.ranker, bundle.features, 20.0, runtime="torch")
    assert torch_ranker.runtime == "torch" and torch_ranker.kernel is None
    items = bundle.features.items.ids[:50]
    scores = np.linspace(0.9, 0.1, 50, dtype=np.float32)
    user = int(bundle.features.users.ids[0])
    np.testing.assert_allclose(
        ranker.score(user, items, scores, 5, 1),
        torch_ranker.score(user, items, scores, 5, 1),
        rtol=0,
        atol=1e-5,
    )
