"""The GPU paths, each timed against the CPU in the same run: two-tower training steps (mean
and sequence user towers), the ranker's forward pass over a request's candidates, and a
FAISS search on the GPU when faiss was built with GPU support.

    python bench/gpu_checks.py [--quick] [--json PATH]

Run by `bench/gpu_checks.sh` on a machine with an NVIDIA GPU; without one every GPU row says
why it is missing, and the CPU rows still run. Synthetic shapes as MovieLens-100K trains
them (1,682 items, 64 dims, 50-item histories); --quick: fewer steps.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.ranking.encoder import NUMERIC_FIELDS
from service.ranking.models import build_ranker
from service.retrieval.two_tower import TwoTower, TwoTowerConfig, in_batch_softmax_loss

ITEMS, USERS, ATTRIBUTES = 1682, 943, 20


def timed(step, repeats: int, device: str) -> float:
    """Mean milliseconds of `step` after two warm-up calls, synchronised on a GPU."""
    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return round((time.perf_counter() - started) / repeats * 1e3, 3)


def training_step(tower: str, device: str):
    """One optimiser step of the two-tower loss at the trainer's batch shapes."""
    config = TwoTowerConfig(user_tower=tower)
    model = TwoTower(config, USERS, ITEMS, ATTRIBUTES).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(0)
    length = config.history_length
    batch = config.sequence_batch if tower == "sequence" else config.batch_size
    users = torch.randint(1, USERS, (batch,), generator=generator).to(device)
    history = torch.randint(1, ITEMS, (batch, length), generator=generator).to(device)
    attributes = torch.randint(1, ATTRIBUTES, (ITEMS, 2), generator=generator).to(device)
    log_q = torch.full((ITEMS,), -float(np.log(ITEMS)), device=device)

    def step():
        if tower == "sequence":  # every position a target, as training does
            states = model.history.every_position(model.item_id(history), history > 0)
            targets = torch.roll(history, -1, 1).reshape(-1)
            user = model.user_output(
                model.user_id(users).unsqueeze(1).expand(-1, length, -1).reshape(-1, 64),
                states.reshape(-1, 64),
            )
        else:
            targets = history[:, -1]
            user = model.user_from_rows(users, history)
        item = model.item_tower(targets, attributes[targets])
        loss = in_batch_softmax_loss(user, item, targets, log_q[targets], config.temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, batch * (length if tower == "sequence" else 1)


def ranker_forward(device: str, candidates: int = 200):
    """The DeepFM ranker scoring one request's candidates."""
    sizes = [USERS, ITEMS, 25, 8]
    model = build_ranker(
        "deepfm",
        {
            "field_sizes": sizes,
            "attribute_size": ATTRIBUTES,
            "numeric_fields": len(NUMERIC_FIELDS),
            "dim": 16,
            "rank": None,
        },
    )
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    categorical = torch.stack(
        [torch.randint(0, size, (candidates,), generator=generator) for size in sizes], 1
    ).to(device)
    attributes = torch.randint(0, ATTRIBUTES, (candidates, 2), generator=generator).to(device)
    numeric = torch.randn(candidates, len(NUMERIC_FIELDS), generator=generator).to(device)

    def step():
        with torch.inference_mode():
            model(categorical, attributes, numeric)

    return step


def faiss_search(repeats: int) -> dict:
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss is not installed"}
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return {"skipped": "faiss has no GPU support here (needs faiss-gpu and a GPU)"}
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(1_000_000, 64)).astype(np.float32)
    queries = rng.normal(size=(1024, 64)).astype(np.float32)
    cpu = faiss.IndexFlatIP(64)
    cpu.add(vectors)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    exact = cpu.search(queries[:64], 100)[1]
    found = gpu.search(queries[:64], 100)[1]
    return {
        "items": len(vectors),
        "cpu_ms_per_1024_queries": timed(lambda: cpu.search(queries, 100), 1, "cpu"),
        "gpu_ms_per_1024_queries": timed(lambda: gpu.search(queries, 100), repeats, "cpu"),
        "top100_agreement": float(
            np.mean([len(set(a) & set(b)) / 100 for a, b in zip(exact, found)])
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
    }
    for tower in ("mean", "sequence"):
        for device in devices:
            step, targets = training_step(tower, device)
            ms = timed(step, repeats, device)
            results[f"train_step_{tower}_{device}"] = {
                "ms": ms,
                "targets_per_s": round(targets / ms * 1e3),
            }
            print(f"two-tower step, {tower} tower, {device}: {ms} ms", flush=True)
    for device in devices:
        results[f"ranker_forward_200_{device}_ms"] = timed(
            ranker_forward(device), repeats * 10, device
        )
        print(
            f"ranker forward, 200 candidates, {device}: {results[f'ranker_forward_200_{device}_ms']} ms"
        )
    results["faiss"] = faiss_search(repeats)
    print(f"faiss: {results['faiss']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
