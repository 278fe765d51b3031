"""The ranker's forward pass: torch (eager, inference mode, one thread) against the numpy
kernel that serves by default (`service.ranking.kernel`), on the same inputs in the same
run, for DeepFM and DCN-v2, each as trained (full tables) and compressed both ways
(output features, weight SVD), at 200 rows (one request's candidates) and 1024 (requests
batched together). Also the largest difference in scores between the two.

    python bench/ranker_runtime.py [--quick] [--json PATH] [--artifacts PATH]

Without --artifacts the models have the shape `recsys train` gives a catalogue of 100k
items and 3k users (DeepFM and DCN-v2 at their default sizes) with random weights of a
trained model's scale (the time of a forward pass does not depend on the values), and the
compressed copies come from `compress` on random calibration rows. With --artifacts, the
artifact's own ranker and its stored variants. Calls alternate between the runtimes in
rounds, so drifts in the machine's speed hit both alike; each figure is the median call.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.ranking.compression import CompressionConfig, compress
from service.ranking.dcn_v2 import DCNv2, DCNv2Config
from service.ranking.deepfm import DeepFM, DeepFMConfig
from service.ranking.encoder import RankingBatch
from service.ranking.kernel import RankerKernel

ROWS = (200, 1024)
# The feature space of `recsys train` on 3k users and 100k items in 64 categories: users,
# items, hour and weekday rows (row 0 = unknown), attribute values, numeric fields.
SIZES = {"field_sizes": (3001, 100_001, 25, 8), "attribute_size": 65, "numeric_fields": 3}


def random_inputs(rows: int, rng: np.random.Generator) -> RankingBatch:
    categorical = np.stack([rng.integers(0, n, rows) for n in SIZES["field_sizes"]], 1)
    attributes = np.zeros((rows, 16), np.int64)
    attributes[:, :2] = rng.integers(1, SIZES["attribute_size"], (rows, 2))
    numeric = rng.random((rows, SIZES["numeric_fields"]), dtype=np.float32)
    return RankingBatch(
        torch.from_numpy(categorical), torch.from_numpy(attributes), torch.from_numpy(numeric)
    )


def synthetic_models(rng: np.random.Generator) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    found = {}
    for name, model in (
        ("deepfm", DeepFM(DeepFMConfig(**SIZES))),
        ("dcn_v2", DCNv2(DCNv2Config(**SIZES))),
    ):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, 0.1)
        model.eval()
        found[f"{name} full"] = model
        calibration = random_inputs(4096, rng)
        for method in ("output_features", "weight_svd"):
            compact, _ = compress(
                model,
                method,
                CompressionConfig(),
                (calibration.categorical, calibration.attributes, calibration.numeric),
            )
            found[f"{name} {method}"] = compact
    return found


def artifact_models(path: Path) -> tuple[dict[str, nn.Module], dict]:
    from service.bundle import ModelBundle

    bundle = ModelBundle.load(path)
    name = bundle.manifest["models"]["ranker"]["type"]
    found = {f"{name} {bundle.ranker_variant}": bundle.ranker}
    for variant in bundle.manifest["models"]["ranker"].get("variants", {}):
        found[f"{name} {variant}"] = ModelBundle.load(path, ranker_variant=variant).ranker
    return found, {"field_sizes": bundle.ranker.fields.layout.field_sizes}


def median_call_ms(calls: dict, batch: RankingBatch, rounds: int, per_round: int) -> dict:
    times = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        for _ in range(5):
            call(batch)
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(per_round):
                call(batch)
            times[name].append((time.perf_counter() - started) / per_round)
    return {name: round(float(np.median(t)) * 1e3, 4) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--artifacts", type=Path, help="time this artifact's rankers")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rounds, per_round = (5, 20) if args.quick else (20, 50)
    if args.artifacts:
        models, shape = artifact_models(args.artifacts)
        SIZES.update(shape)
    else:
        models = synthetic_models(rng)
    results = {"rounds": rounds, "calls_per_round": per_round, "models": {}}
    print("| model | rows | torch ms | numpy ms | torch / numpy | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        kernel = RankerKernel(model)

        def torch_forward(batch: RankingBatch, model=model) -> np.ndarray:
            with torch.inference_mode():
                logits = model(batch.categorical, batch.attributes, batch.numeric)
            return torch.sigmoid(logits).numpy()

        for rows in ROWS:
            batch = random_inputs(rows, rng)
            difference = float(np.abs(torch_forward(batch) - kernel(batch)).max())
            timed = median_call_ms(
                {"torch": torch_forward, "numpy": kernel}, batch, rounds, per_round
            )
            ratio = round(timed["torch"] / timed["numpy"], 2)
            results["models"].setdefault(name, {})[str(rows)] = {
                **timed,
                "torch_over_numpy": ratio,
                "max_abs_diff": difference,
            }
            print(
                f"| {name} | {rows} | {timed['torch']} | {timed['numpy']} | {ratio} | "
                f"{difference:.1e} |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
