"""The models of one artifact version, written and loaded as `service.artifacts` lays out."""

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file as load_tensors
from safetensors.torch import save_file as save_tensors

from service.artifacts import FORMAT, MANIFEST, read_manifest, resolve_version, sha256_file
from service.features import FeatureSpace
from service.history import UserHistories
from service.ranking.deepfm import DeepFM, DeepFMConfig
from service.retrieval.index import ItemIndex
from service.retrieval.two_tower import TwoTower, TwoTowerConfig


@dataclass
class ModelBundle:
    """Everything the serving pipeline needs from one artifact version."""

    version: str
    features: FeatureSpace
    two_tower: TwoTower
    index: ItemIndex
    ranker: DeepFM
    histories: UserHistories
    popular_items: np.ndarray  # uint64, most popular first
    popular_scores: np.ndarray  # float32: cosine with the cold-user vector, the retrieval scale
    manifest: dict

    @property
    def namespace(self) -> str:
        """A short name for this version's tables in a shared store: its random token."""
        return self.version.rsplit("-", 1)[-1]

    def save(self, root: str | Path, config: dict, schema: dict, metrics: dict) -> Path:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)
        staging = root / f".staging-{version}"
        staging.mkdir()
        try:
            self.features.save(staging)
            save_tensors({k: v.contiguous() for k, v in self.two_tower.state_dict().items()}, staging / "two_tower.safetensors")
            save_tensors({k: v.contiguous() for k, v in self.ranker.state_dict().items()}, staging / "ranker.safetensors")
            self.index.save(staging / "items.faiss")
            self.histories.save(staging / "histories.safetensors")
            save_arrays({"items": self.popular_items, "scores": self.popular_scores}, staging / "popular.safetensors")
            manifest = {
                "format": FORMAT,
                "version": version,
                "created_at": datetime.now(UTC).isoformat(),
                "config": config,
                "models": {
                    "two_tower": self.two_tower.config.__dict__,
                    "ranker": {"type": "deepfm", **self.ranker.config.__dict__},
                },
                "data_schema": schema,
                "metrics": metrics,
                "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir())},
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=list))
            final = root / version
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.version, self.manifest = version, manifest
        return final

    @classmethod
    def load(cls, path: str | Path, root: str | Path | None = None) -> "ModelBundle":
        folder = resolve_version(path)
        manifest = read_manifest(folder, root if root is not None else path)
        features = FeatureSpace.load(folder)
        two_tower_config = TwoTowerConfig(**manifest["models"]["two_tower"])
        two_tower = TwoTower(two_tower_config, features.users.size, features.items.size, features.attribute_size)
        two_tower.load_state_dict(load_tensors(folder / "two_tower.safetensors"))
        ranker_config = dict(manifest["models"]["ranker"])
        ranker_config.pop("type")
        ranker_config["field_sizes"] = tuple(ranker_config["field_sizes"])
        ranker_config["hidden"] = tuple(ranker_config["hidden"])
        ranker = DeepFM(DeepFMConfig(**ranker_config))
        ranker.load_state_dict(load_tensors(folder / "ranker.safetensors"))
        popular = load_arrays(folder / "popular.safetensors")
        return cls(
            version=manifest["version"],
            features=features,
            two_tower=two_tower.eval(),
            index=ItemIndex.load(folder / "items.faiss"),
            ranker=ranker.eval(),
            histories=UserHistories.load(folder / "histories.safetensors"),
            popular_items=popular["items"],
            popular_scores=popular["scores"],
            manifest=manifest,
        )
