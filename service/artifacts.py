"""Versioned artifact folders: what training writes and serving loads.

    <root>/<version>/
        manifest.json          version, config, data schema, metrics, sha256 of every file
        features.safetensors   id vocabularies, item attributes, item counts
        features.json          attribute value names
        two_tower.safetensors  two-tower weights (id vectors + tower layers)
        ranker.safetensors     DeepFM weights
        items.faiss            FAISS index of item vectors over real item ids
        histories.safetensors  each user's training items, oldest first
        popular.safetensors    items by training popularity

A version is written to a hidden temporary folder and renamed into place, so a reader
never sees half of one. Loading checks every file's sha256 against the manifest and
refuses paths outside the artifact root. Nothing is unpickled.
"""

import hashlib
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

from service.features import FeatureSpace
from service.history import UserHistories
from service.ranking.deepfm import DeepFM, DeepFMConfig
from service.retrieval.index import ItemIndex
from service.retrieval.two_tower import TwoTower, TwoTowerConfig

MANIFEST = "manifest.json"
FORMAT = "recsys-artifact/1"


class ArtifactError(RuntimeError):
    """An artifact that cannot be served, and why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_version(path: str | Path) -> Path:
    """The version folder to serve: `path` itself if it holds a manifest, else its newest
    version (versions sort by their timestamped names)."""
    path = Path(path).resolve()
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise ArtifactError(f"artifact path {path} does not exist")
    versions = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())
    if not versions:
        raise ArtifactError(f"no artifact version under {path}: run `recsys train --out {path}`")
    return versions[-1]


def read_manifest(folder: Path, root: Path | None = None) -> dict:
    """The manifest of a version folder, after checking every file it lists."""
    folder = folder.resolve()
    if root is not None and not folder.is_relative_to(Path(root).resolve()):
        raise ArtifactError(f"{folder} is outside the artifact root {Path(root).resolve()}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {folder / MANIFEST}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{folder}: unknown artifact format {manifest.get('format')!r}")
    for name, expected in manifest["files"].items():
        path = (folder / name).resolve()
        if path.parent != folder:
            raise ArtifactError(f"manifest names {name!r}, which is not a file of {folder}")
        if not path.is_file():
            raise ArtifactError(f"{folder}: file {name} listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{folder}: sha256 of {name} is {actual}, manifest says {expected}")
    return manifest


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
    popular_counts: np.ndarray
    manifest: dict

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
            save_arrays({"items": self.popular_items, "counts": self.popular_counts}, staging / "popular.safetensors")
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
            popular_counts=popular["counts"],
            manifest=manifest,
        )
