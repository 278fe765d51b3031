"""The CTR models a ranker can be, by name: what the artifact's manifest records and what
`recsys train --ranker` chooses."""

from dataclasses import dataclass

from torch import nn

from service.ranking.compression import CompressionPlan
from service.ranking.dcn_v2 import DCNv2, DCNv2Config
from service.ranking.deepfm import DeepFM, DeepFMConfig

RANKERS = {"deepfm": (DeepFM, DeepFMConfig), "dcn_v2": (DCNv2, DCNv2Config)}


def ranker_name(model: nn.Module) -> str:
    return next(name for name, (cls, _) in RANKERS.items() if isinstance(model, cls))


def build_ranker(name: str, config: dict, start_from_numeric: int | None = None) -> nn.Module:
    """A `name` model from its configuration fields (as the manifest stores them)."""
    if name not in RANKERS:
        raise ValueError(f"unknown ranker {name!r}; one of {sorted(RANKERS)}")
    model_class, config_class = RANKERS[name]
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return model_class(config_class(**tuples), start_from_numeric=start_from_numeric)


@dataclass
class RankerVariant:
    """A compressed copy of the trained ranker, the plan that rebuilds its shape, and its
    validation metrics next to the trained model's."""

    model: nn.Module
    plan: CompressionPlan
    metrics: dict


def trained_variant(rank: int | None) -> str:
    """The name a trained ranker serves under: `full`, or `factorised` (rank-r tables)."""
    return "full" if rank is None else "factorised"
