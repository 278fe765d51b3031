"""A standalone CTR model as a version folder (`recsys ctr train`): the weights as
safetensors, the field map that encodes its inputs, and a manifest with the model's
configuration, its compression plan, its metrics and sizes, and every file's sha256.

    <root>/<version>/
        manifest.json       format recsys-ctr/1; model type, configuration and compression
                            plan; training configuration; dev and test metrics; bytes
        model.safetensors   the weights (compressed ones in the plan's shape)
        field_map.json      fields, vocabularies and numeric scaling (`FieldMap`)
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file as load_tensors
from safetensors.torch import save_file as save_tensors
from torch import nn

from service.artifacts import read_manifest, resolve_version, write_version
from service.ctr.field_map import FieldMap
from service.ctr.tables import load_ctr_table
from service.ctr.training import CtrTrainConfig, predict, tensors, train_ctr
from service.ranking.compression import (
    CompressionConfig,
    CompressionPlan,
    Method,
    compress,
    compressed_shape,
    model_bytes,
)
from service.ranking.models import build_ranker, ranker_name
from service.training.loop import binary_metrics

log = logging.getLogger(__name__)

CTR_FORMAT = "recsys-ctr/1"


@dataclass
class CtrModel:
    model: nn.Module
    fields: FieldMap
    manifest: dict
    folder: Path


def save_ctr_model(
    root: str | Path,
    model: nn.Module,
    fields: FieldMap,
    plan: CompressionPlan | None,
    training: dict,
    metrics: dict,
) -> CtrModel:
    """`model` as trained (or compressed by `plan`) into a new version under `root`."""

    def write(folder: Path) -> dict:
        save_tensors(
            {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
        )
        (folder / "field_map.json").write_text(fields.to_json())
        return {
            "model": {
                "type": ranker_name(model),
                "config": model.config.__dict__,
                "compression": plan.to_json() if plan else None,
            },
            "training": training,
            "metrics": metrics,
            "bytes": model_bytes(model),
        }

    folder, manifest = write_version(root, CTR_FORMAT, write)
    return CtrModel(model.eval(), fields, manifest, folder)


def load_ctr_model(path: str | Path, root: str | Path | None = None) -> CtrModel:
    """The newest version under `path` (or `path` itself), its files checked against the manifest."""
    folder = resolve_version(path)
    manifest = read_manifest(folder, root if root is not None else path, fmt=CTR_FORMAT)
    described = manifest["model"]
    model = build_ranker(described["type"], described["config"])
    if described["compression"]:
        model = compressed_shape(model, CompressionPlan.from_json(described["compression"]))
    model.load_state_dict(load_tensors(folder / "model.safetensors"))
    fields = FieldMap.from_json((folder / "field_map.json").read_text())
    return CtrModel(model.eval(), fields, manifest, folder)


@dataclass(frozen=True)
class CtrModelConfig:
    model: str = "deepfm"
    dim: int = 16
    rank: int | None = None  # factorised tables trained end to end
    compression: Method | None = None  # post-training compression of a full-table model
    compression_config: CompressionConfig = field(default_factory=CompressionConfig)
    calibration_rows: int = 4096
    train: CtrTrainConfig = field(default_factory=CtrTrainConfig)


def fit_ctr_model(spec: str, root: str | Path, config: CtrModelConfig) -> CtrModel:
    """Train a CTR model on the click table `spec` (`service.ctr.tables`), early-stopped
    on dev AUC, compress it if asked, measure dev and test AUC and logloss (of the model as
    trained too, when compressed) and save it under `root`."""
    if config.rank is not None and config.compression is not None:
        raise ValueError(
            "compression applies to full-table models; a factorised one (rank) is low-rank already"
        )
    fields, splits = load_ctr_table(spec, config.train.seed)
    train, dev, test = (fields.encode(splits[s]) for s in ("train", "dev", "test"))
    log.info(
        "%s: %d train, %d dev, %d test rows; fields %s",
        spec,
        len(train),
        len(dev),
        len(test),
        fields.field_sizes,
    )
    layout = {
        "field_sizes": fields.field_sizes,
        "attribute_size": fields.multi_size,
        "numeric_fields": len(fields.numeric),
    }
    model = build_ranker(config.model, {**layout, "dim": config.dim, "rank": config.rank})
    history = train_ctr(model, train, dev, config.train, config.model)

    def measured(model: nn.Module) -> dict:
        return {
            split: binary_metrics(rows.labels, predict(model, rows))
            for split, rows in (("dev", dev), ("test", test))
        }

    metrics = {
        **measured(model),
        "best_epoch": history["best"]["epoch"],
        "epochs": history["epochs"],
    }
    plan = None
    if config.compression is not None:
        picked = np.random.default_rng(config.train.seed).choice(
            len(train), min(config.calibration_rows, len(train)), replace=False
        )
        trained = {"dev": metrics["dev"], "test": metrics["test"], "bytes": model_bytes(model)}
        model, plan = compress(
            model, config.compression, config.compression_config, tensors(train.take(picked))
        )
        metrics.update(measured(model), trained=trained)
    return save_ctr_model(root, model, fields, plan, {"dataset": spec, **asdict(config)}, metrics)
