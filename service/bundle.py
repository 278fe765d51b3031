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
from torch import nn

from service.artifacts import FORMAT, MANIFEST, read_manifest, resolve_version, sha256_file
from service.features import FeatureSpace
from service.history import UserHistories
from service.ranking.models import build_ranker, ranker_name
from service.retrieval.index import Device, ItemIndex, SearchParams
from service.retrieval.index_versions import load_index_version, newest_index_file
from service.retrieval.knn_embed import ItemClusters, KnnEmbedConfig, UserMixtures
from service.retrieval.two_tower import TwoTower, TwoTowerConfig


@dataclass
class ModelBundle:
    """Everything the serving pipeline needs from one artifact version."""

    version: str
    features: FeatureSpace
    two_tower: TwoTower
    index: ItemIndex
    ranker: nn.Module  # DeepFM or DCN-v2
    histories: UserHistories
    clusters: ItemClusters  # kNN-Embed: item clusters, the interests
    mixtures: UserMixtures  # kNN-Embed: the artifact's users' interests
    popular_items: np.ndarray  # uint64, most popular first
    popular_scores: np.ndarray  # float32: cosine with the cold-user vector, the retrieval scale
    manifest: dict
    folder: Path | None = None  # the version folder it was loaded from
    index_version: str = "artifact"  # which index: the artifact's own, or a rebuilt one (indexes/)

    @property
    def knn_embed_config(self) -> KnnEmbedConfig:
        return KnnEmbedConfig(**self.manifest["models"]["knn_embed"])

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
            self.clusters.save(staging / "clusters.faiss")
            self.mixtures.save(staging / "interests.safetensors")
            save_arrays({"items": self.popular_items, "scores": self.popular_scores}, staging / "popular.safetensors")
            manifest = {
                "format": FORMAT,
                "version": version,
                "created_at": datetime.now(UTC).isoformat(),
                "config": config,
                "models": {
                    "two_tower": self.two_tower.config.__dict__,
                    "ranker": {"type": ranker_name(self.ranker), **self.ranker.config.__dict__},
                    "knn_embed": {**config.get("knn_embed", {}), "clusters": self.clusters.n_clusters},
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
        self.version, self.manifest, self.folder = version, manifest, final
        return final

    @classmethod
    def load(
        cls,
        path: str | Path,
        root: str | Path | None = None,
        index_params: SearchParams = SearchParams(),
        index_device: Device = "cpu",
    ) -> "ModelBundle":
        """The newest version under `path` (or `path` itself), serving its newest index version."""
        folder = resolve_version(path)
        manifest = read_manifest(folder, root if root is not None else path)
        features = FeatureSpace.load(folder)
        two_tower_config = TwoTowerConfig(**manifest["models"]["two_tower"])
        two_tower = TwoTower(two_tower_config, features.users.size, features.items.size, features.attribute_size)
        two_tower.load_state_dict(load_tensors(folder / "two_tower.safetensors"))
        ranker_config = dict(manifest["models"]["ranker"])
        ranker = build_ranker(ranker_config.pop("type"), ranker_config)
        ranker.load_state_dict(load_tensors(folder / "ranker.safetensors"))
        popular = load_arrays(folder / "popular.safetensors")
        index_file, index_version = newest_index_file(folder)
        if index_version == "artifact":
            index = ItemIndex.load(index_file, index_params, index_device)
        else:
            index = load_index_version(index_file.parent, index_params, index_device)
        return cls(
            version=manifest["version"],
            features=features,
            two_tower=two_tower.eval(),
            index=index,
            ranker=ranker.eval(),
            histories=UserHistories.load(folder / "histories.safetensors"),
            clusters=ItemClusters.load(folder / "clusters.faiss"),
            mixtures=UserMixtures.load(folder / "interests.safetensors"),
            popular_items=popular["items"],
            popular_scores=popular["scores"],
            manifest=manifest,
            folder=folder,
            index_version=index_version,
        )
