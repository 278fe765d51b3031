"""The artifact format: versioned folders that training writes and serving loads.

    <root>/<version>/
        manifest.json          version, config, data schema, metrics, sha256 of every file
        features.safetensors   id vocabularies, item attributes, item counts
        features.json          attribute value names
        two_tower.safetensors  two-tower weights (id vectors + tower layers)
        ranker.safetensors     the ranker's weights as trained (DeepFM or DCN-v2, full or
                               factorised tables)
        ranker.<method>.safetensors  low-rank compressed copies of a full-table ranker
                               (output_features, weight_svd); their shapes in the manifest
        items.faiss            FAISS index of item vectors over real item ids
        histories.safetensors  each user's training items, oldest first
        popular.safetensors    items by training popularity, with their cosine to a cold user
        item_neighbours.safetensors  each item's most co-occurring items (item-to-item source)

A standalone CTR model (`recsys ctr train`) is a version folder of the same kind with its
own format: model.safetensors, field_map.json and the manifest.

A version is written to a hidden temporary folder and renamed into place, so a reader
never sees half of one. Loading checks every file's sha256 against the manifest and
refuses paths outside the artifact root. Nothing is unpickled. `service.bundle` writes and
reads the models inside; this module stays free of them, so tools can find and check
artifacts without importing torch.
"""

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

MANIFEST = "manifest.json"
FORMAT = "recsys-artifact/4"


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
    versions = sorted(
        p
        for p in path.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
    )
    if not versions:
        raise ArtifactError(f"no artifact version under {path}: run `recsys train --out {path}`")
    return versions[-1]


def write_version(root: str | Path, fmt: str, write: Callable[[Path], dict]) -> tuple[Path, dict]:
    """A new version folder under `root`: `write(folder)` writes the files and returns the
    manifest's content; the manifest adds format, version, time and every file's sha256.
    Staged in a hidden folder and renamed into place."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)
    staging = root / f".staging-{version}"
    staging.mkdir()
    try:
        content = write(staging)
        manifest = {
            "format": fmt,
            "version": version,
            "created_at": datetime.now(UTC).isoformat(),
            **content,
            "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir())},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=list))
        final = root / version
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final, manifest


RankerChoice = Literal["auto", "on", "off"]  # auto: as the artifact's validation chose


def ranker_serves(manifest: dict, choice: RankerChoice = "auto") -> bool:
    """Whether answers are ranked by the artifact's ranker or left in retrieval order: "on" and
    "off" say so; "auto" follows `recsys train`'s validation (the ranker serves where ranked
    order validated above retrieval order; an artifact trained without validation ranks)."""
    if choice != "auto":
        return choice == "on"
    return bool(manifest.get("validation", {}).get("choices", {}).get("ranker", True))


RankerVariantChoice = Literal["auto", "trained", "output_features", "weight_svd"]
# Deep CTR models sit within about 0.001-0.002 AUC of each other on public benchmarks: a
# compressed copy within this much of the ranker as trained has lost nothing measurable.
COMPRESSED_AUC_TOLERANCE = 0.001


def ranker_variant_serves(manifest: dict, choice: RankerVariantChoice = "auto") -> str | None:
    """The ranker variant to serve (None: the ranker as trained): "trained" and a variant's
    name say so; "auto" takes the smallest compressed copy whose validation AUC is within
    `COMPRESSED_AUC_TOLERANCE` of the ranker as trained, else the ranker as trained."""
    if choice == "trained":
        return None
    if choice != "auto":
        return choice
    measured = manifest.get("metrics", {}).get("ranker", {})
    trained_auc = measured.get("val_auc")
    if trained_auc is None:  # no ranker was trained: nothing to compare with
        return None
    qualifying = [
        (figures["bytes"]["total"], name)
        for name, figures in measured.get("variants", {}).items()
        if figures["val_auc"] >= trained_auc - COMPRESSED_AUC_TOLERANCE
    ]
    return min(qualifying)[1] if qualifying else None


def ranker_variant_figures(manifest: dict, variant: str) -> dict[str, str]:
    """What the served variant measured on validation beside the ranker as trained (AUC,
    float32 bytes), as strings for an info metric; empty for an artifact without them."""
    measured = manifest.get("metrics", {}).get("ranker", {})
    if "val_auc" not in measured:
        return {}
    served = measured.get("variants", {}).get(variant, measured)
    return {
        "ranker_val_auc": f"{served['val_auc']:.4f}",
        "ranker_bytes": str(served["bytes"]["total"]),
        "ranker_trained_val_auc": f"{measured['val_auc']:.4f}",
        "ranker_trained_bytes": str(measured["bytes"]["total"]),
    }


def item_to_item_share(manifest: dict, setting: float | None = None) -> float:
    """The share of candidates the item-to-item source takes: the setting when given, else
    what `recsys train`'s validation chose (none for an artifact trained without it)."""
    if setting is not None:
        return setting
    return float(manifest.get("validation", {}).get("choices", {}).get("item_to_item_share", 0.0))


def read_manifest(folder: Path, root: Path | None = None, fmt: str = FORMAT) -> dict:
    """The manifest of a version folder in format `fmt`, after checking every file it lists."""
    folder = folder.resolve()
    if root is not None and not folder.is_relative_to(Path(root).resolve()):
        raise ArtifactError(f"{folder} is outside the artifact root {Path(root).resolve()}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {folder / MANIFEST}: {exc}") from None
    if manifest.get("format") != fmt:
        raise ArtifactError(
            f"{folder}: artifact format {manifest.get('format')!r}, this version reads {fmt!r}: "
            "train a new version with `recsys train`"
        )
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
