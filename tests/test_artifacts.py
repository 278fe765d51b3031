import json
import shutil

import pytest

from service.artifacts import MANIFEST, ArtifactError, read_manifest, resolve_version
from service.bundle import ModelBundle
from service.pipeline.in_process import RecommendPipeline
from service.schemas import RecommendRequest


def test_manifest_records_config_schema_metrics_and_hashes(artifact_root):
    folder = resolve_version(artifact_root)
    manifest = read_manifest(folder)
    assert set(manifest["files"]) == {
        "features.safetensors",
        "features.json",
        "two_tower.safetensors",
        "ranker.safetensors",
        "items.faiss",
        "histories.safetensors",
        "popular.safetensors",
        "clusters.faiss",
        "interests.safetensors",
        "item_neighbours.safetensors",
        "ranker.output_features.safetensors",
        "ranker.weight_svd.safetensors",
    }
    assert manifest["data_schema"]["users"] == 200
    assert manifest["config"]["two_tower"]["temperature"] == 0.05
    assert 0.0 < manifest["metrics"]["ranker"]["val_auc"] <= 1.0
    assert manifest["version"] == folder.name


def copy_version(artifact_root, tmp_path):
    target = tmp_path / "root"
    shutil.copytree(resolve_version(artifact_root), target / "v1")
    return target, target / "v1"


def test_tampered_file_is_refused(artifact_root, tmp_path):
    root, folder = copy_version(artifact_root, tmp_path)
    with (folder / "ranker.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="sha256 of ranker.safetensors"):
        ModelBundle.load(root)


def test_missing_file_and_foreign_path_are_refused(artifact_root, tmp_path):
    root, folder = copy_version(artifact_root, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../escape.bin"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a file of"):
        read_manifest(folder)
    (folder / "items.faiss").unlink()
    del manifest["files"]["../escape.bin"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="items.faiss listed in the manifest is missing"):
        read_manifest(folder)


def test_version_outside_the_root_is_refused(artifact_root, tmp_path):
    _, folder = copy_version(artifact_root, tmp_path)
    other_root = tmp_path / "elsewhere"
    other_root.mkdir()
    with pytest.raises(ArtifactError, match="outside the artifact root"):
        ModelBundle.load(folder, root=other_root)


def test_newest_version_is_served_and_staging_folders_ignored(artifact_root, tmp_path):
    root, folder = copy_version(artifact_root, tmp_path)
    shutil.copytree(folder, root / "v2")
    (root / ".staging-v3").mkdir()
    assert resolve_version(root) == (root / "v2").resolve()
    with pytest.raises(ArtifactError, match="no artifact version"):
        resolve_version(tmp_path / "root" / ".staging-v3")


def test_a_second_load_answers_identically(artifact_root, pipeline, known_user):
    again = RecommendPipeline(ModelBundle.load(artifact_root))
    request = RecommendRequest(user_id=known_user, k=5)
    unique = {"request_id"}  # every answer has its own
    assert again.recommend(request).model_dump(exclude=unique) == pipeline.recommend(
        request
    ).model_dump(exclude=unique)
