"""The package's layers: each folder or top-level module of `service/` imports only from its
own layer or below, the units of one layer never import each other both ways, and the
gateway process loads no model library. docs/architecture.md draws the same table."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "service"

# Lowest first: the units (folders and top-level modules of service/) of each layer.
LAYERS = [
    {
        "proto_gen",
        "schemas",
        "settings",
        "metrics",
        "breaker",
        "artifacts",
    },  # the contract and the plumbing
    {"data"},  # datasets and what is derived from them without a model
    {"embeddings"},  # the embedding tables and the recent items beside them
    {"retrieval", "ranking"},  # the models, the index, candidate generation, the served ranker
    {"bundle"},  # one artifact version's models, written and loaded
    {
        "artifact_tables",
        "training",
        "online",
    },  # an artifact's rows in a store; offline training; online learning
    {
        "pipeline",
        "ctr",
        "evaluation",
        "prequential",
    },  # the in-process pipeline; the offline CTR tools; offline and prequential evaluation
    {"api"},  # transports, the gateway, the tiers, the process runner
    {"cli", "probe", "testing"},  # entry points and test tooling
]
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    """The `service.*` modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
            found.add(node.module)
            found.update(
                f"{node.module}.{alias.name}" for alias in node.names if node.module == "service"
            )
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("service"))
    return {m for m in found if m.count(".") >= 1}


def unit_edges() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the files that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent)
        if relative.parts[1] == "proto_gen":
            continue
        importer = relative.parts[1].removesuffix(".py")
        for module in imports_of(path):
            imported = unit_of(module)
            if imported != importer:
                edges.setdefault((importer, imported), []).append(str(relative))
    return edges


def test_every_unit_of_the_package_has_a_layer():
    units = {
        p.name.removesuffix(".py")
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert units - {"__init__"} == set(LAYER), (
        "place a new folder or module in LAYERS (and docs/architecture.md)"
    )


def test_units_import_only_their_own_layer_or_below():
    upward = {
        edge: files for edge, files in unit_edges().items() if LAYER[edge[1]] > LAYER[edge[0]]
    }
    assert not upward, f"imports that point up a layer: {upward}"


def test_no_two_units_import_each_other():
    edges = unit_edges()
    both_ways = {(a, b) for a, b in edges if (b, a) in edges and a < b}
    assert not both_ways, (
        f"two-way ties: {[(pair, edges[pair], edges[pair[::-1]]) for pair in both_ways]}"
    )


@pytest.mark.parametrize("entry", ["service.api.gateway", "service.api.remote", "service.cli"])
def test_the_gateway_process_imports_no_model_library(entry, tmp_path):
    """`recsys serve gateway` imports the CLI, then the gateway's app: neither may pull in
    torch, FAISS or scikit-learn (hundreds of MiB the gateway never uses)."""
    code = (
        f"import sys, {entry}\n"
        "from service.api.gateway import build_app\n"
        "from service.settings import Settings\n"
        "build_app(Settings(retrieval_address='127.0.0.1:1', ranking_address='127.0.0.1:2', redis_url='redis://127.0.0.1:3',"
        f" artifacts={str(tmp_path)!r}))\n"
        "print(sorted(m for m in ('torch', 'faiss', 'sklearn', 'scipy') if m in sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"
