"""Versioned item indexes inside an artifact, and swapping to a new one while serving.

An artifact version ships `items.faiss`; `recsys index build` adds rebuilt indexes (another
factory, or the item vectors the online trainer has written since) beside it:

    <artifact>/indexes/<UTC timestamp>-<token>/items.faiss
    <artifact>/indexes/<UTC timestamp>-<token>/index.json   (factory, items, sha256, ...)

A version folder appears by an atomic rename, so a reader never sees half of one. Serving
processes load the newest one at start and poll for newer ones: load, check the sha256,
warm up, replay the online item updates into it, then swap.
"""

import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from service.artifacts import ArtifactError, sha256_file
from service.embeddings.store import EmbeddingStore
from service.embeddings.tables import ITEM_TABLE
from service.metrics import INDEX_INFO, INDEX_SWAPS
from service.retrieval.index import Device, ItemIndex, SearchParams

log = logging.getLogger(__name__)

INDEXES = "indexes"
INDEX_FILE, INDEX_MANIFEST = "items.faiss", "index.json"


def index_versions(artifact: Path) -> list[Path]:
    """Index version folders of an artifact version, oldest first."""
    folder = artifact / INDEXES
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and (p / INDEX_MANIFEST).is_file()
    )


def newest_index_file(artifact: Path) -> tuple[Path, str]:
    """(index file, its version name) to serve: the newest index version, else the artifact's own."""
    versions = index_versions(artifact)
    if versions:
        return versions[-1] / INDEX_FILE, versions[-1].name
    return artifact / INDEX_FILE, "artifact"


def load_index_version(folder: Path, params: SearchParams, device: Device) -> ItemIndex:
    """An index version's index, after checking the file against its manifest's sha256."""
    manifest = json.loads((folder / INDEX_MANIFEST).read_text())
    if sha256_file(folder / INDEX_FILE) != manifest["sha256"]:
        raise ArtifactError(
            f"{folder / INDEX_FILE}: sha256 differs from {INDEX_MANIFEST}; refusing to load it"
        )
    return ItemIndex.load(folder / INDEX_FILE, params, device)


def table_item_vectors(
    bundle, store: EmbeddingStore, batch_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, item-tower vectors) of every item the table holds: the artifact's, and those the
    online trainer added or moved since."""
    features, ids, vectors = bundle.features, [], []
    total = store.size(ITEM_TABLE)
    with tqdm(total=total, desc="embed items", unit="item", mininterval=2) as bar:
        for batch_ids, batch_vectors in store.scan(ITEM_TABLE, batch_size):
            attributes = torch.from_numpy(features.item_attributes[features.items.rows(batch_ids)])
            with torch.inference_mode():
                out = bundle.two_tower.item_tower_from_vectors(
                    torch.from_numpy(batch_vectors), attributes
                )
            ids.append(batch_ids)
            vectors.append(out.numpy())
            bar.update(len(batch_ids))
    if not ids:
        return np.empty(0, np.uint64), np.empty((0, bundle.two_tower.config.out_dim), np.float32)
    return np.concatenate(ids), np.concatenate(vectors)


def build_index_version(
    artifact: Path, ids: np.ndarray, vectors: np.ndarray, factory: str, seed: int = 0
) -> Path:
    """Build an index over (ids, vectors) and publish it as the artifact's newest index version."""
    started = time.perf_counter()
    index = ItemIndex.build(ids, vectors, factory, seed=seed)
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)
    (artifact / INDEXES).mkdir(exist_ok=True)
    staging = artifact / INDEXES / f".staging-{version}"
    staging.mkdir()
    try:
        index.save(staging / INDEX_FILE)
        manifest = {
            "version": version,
            "factory": factory,
            "description": index.description,
            "items": len(index),
            "dim": int(vectors.shape[1]),
            "build_seconds": round(time.perf_counter() - started, 2),
            "bytes": (staging / INDEX_FILE).stat().st_size,
            "sha256": sha256_file(staging / INDEX_FILE),
            "built_at": datetime.now(UTC).isoformat(),
        }
        (staging / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.rename(staging, artifact / INDEXES / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return artifact / INDEXES / version


class IndexReloader:
    """Watches an artifact's index versions and swaps the serving index to a newer one.

    `swap(new_index)` makes the served index use the new one (index sync first replays the
    online updates into it); by default one reference change under the index's lock."""

    def __init__(
        self,
        artifact: Path,
        index: ItemIndex,
        current: str,
        params: SearchParams,
        device: Device,
        swap: Callable[[ItemIndex], None] | None = None,
    ):
        self.artifact = artifact
        self.index = index
        self.current = current
        self._tried = current  # the newest version looked at: a broken one is not retried
        self.params = params
        self.device = device
        self.swap = swap or index.replace_with
        self._lock = threading.Lock()  # the poller and an admin reload may both check
        INDEX_INFO.info({"version": current, "type": index.description, "device": index.device})

    def check(self) -> bool:
        """Swap to the newest index version if it is not the one served; True if it swapped."""
        with self._lock:
            return self._check()

    def _check(self) -> bool:
        versions = index_versions(self.artifact)
        if not versions or versions[-1].name == self._tried:
            return False
        folder = versions[-1]
        self._tried = folder.name
        started = time.perf_counter()
        try:
            new = load_index_version(folder, self.params, self.device)
            new.warm_up()
            self.swap(new)
        except Exception:
            INDEX_SWAPS.labels("failed").inc()
            log.exception(
                "index version %s not swapped in; still serving %s", folder.name, self.current
            )
            return False
        INDEX_SWAPS.labels("swapped").inc()
        log.info(
            "serving index %s (%s, %d items) after %.2f s to load and warm up",
            folder.name,
            new.description,
            len(new),
            time.perf_counter() - started,
        )
        self.current = folder.name
        INDEX_INFO.info({"version": folder.name, "type": new.description, "device": new.device})
        return True

    def run(self, stop: threading.Event, poll_seconds: float) -> None:
        while not stop.wait(poll_seconds):
            self.check()
