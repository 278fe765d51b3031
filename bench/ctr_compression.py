"""DeepFM and DCN-v2, uncompressed and low-rank compressed three ways, on MovieLens-100K as
CTR and on the Criteo rows: size, AUC, logloss and scoring latency, all in one run.

    python bench/ctr_compression.py [--quick] [--json PATH] [--data ../shared/data]

For each dataset and model: the uncompressed model trained with early stopping on the dev
split; the same model with factorised tables (rank r) trained end to end; output-feature
compression (Yu et al. 2024) and weight SVD of the trained uncompressed model at the same
ranks (calibration: 4,096 training rows). Test AUC and logloss with 95% bootstrap intervals,
and the AUC difference to the uncompressed model with a paired bootstrap interval. Latency:
one forward pass over 1 / 64 / 256 / 1024 candidate rows, one thread, all variants
interleaved per repetition. --quick: 2 epochs on at most 40,000 training rows, fewer
repetitions and resamples.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.ctr.field_map import FieldMap
from service.ctr.tables import load_ctr_table
from service.ctr.training import CtrTrainConfig, predict, tensors, train_ctr
from service.ranking.compression import CompressionConfig, compress, model_bytes
from service.ranking.models import build_ranker

BATCHES = (1, 64, 256, 1024)
VARIANTS = ("uncompressed", "factorised", "output_features", "weight_svd")


def datasets(root: Path) -> dict[str, tuple[FieldMap, dict]]:
    """name -> (field map, {split: frame}) of the click tables found under `root`."""
    found = {}
    if (root / "movielens-100k").is_dir():
        found["movielens-100k-ctr"] = load_ctr_table(f"movielens-100k:{root / 'movielens-100k'}")
    if (root / "criteo-kaggle-8k").is_dir():
        found["criteo-8k"] = load_ctr_table(f"criteo:{root / 'criteo-kaggle-8k'}")
    return found


def build(model: str, fields: FieldMap, rank: int | None) -> torch.nn.Module:
    layout = {
        "field_sizes": fields.field_sizes,
        "attribute_size": fields.multi_size,
        "numeric_fields": len(fields.numeric),
        "rank": rank,
    }
    return build_ranker(model, layout)


def bootstrap(
    labels: np.ndarray, predicted: dict[str, np.ndarray], rng: np.random.Generator, resamples: int
) -> dict:
    """Per variant: AUC, logloss and their 95% intervals, and AUC minus the uncompressed
    model's on the same resamples."""
    draws = [rng.integers(0, len(labels), len(labels)) for _ in range(resamples)]
    draws = [d for d in draws if 0 < labels[d].sum() < len(d)]
    base = np.array([roc_auc_score(labels[d], predicted["uncompressed"][d]) for d in draws])
    out = {}
    for name, p in predicted.items():
        aucs = np.array([roc_auc_score(labels[d], p[d]) for d in draws])
        losses = np.array(
            [log_loss(labels[d], np.clip(p[d], 1e-7, 1 - 1e-7), labels=[0, 1]) for d in draws]
        )
        out[name] = {
            "auc": round(float(roc_auc_score(labels, p)), 4),
            "auc_ci": [round(float(x), 4) for x in np.percentile(aucs, [2.5, 97.5])],
            "logloss": round(float(log_loss(labels, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])), 4),
            "logloss_ci": [round(float(x), 4) for x in np.percentile(losses, [2.5, 97.5])],
            "delta_auc": round(
                float(roc_auc_score(labels, p) - roc_auc_score(labels, predicted["uncompressed"])),
                4,
            ),
            "delta_auc_ci": [round(float(x), 4) for x in np.percentile(aucs - base, [2.5, 97.5])],
        }
    return out


def latencies(models: dict[str, torch.nn.Module], rows, repetitions: int) -> dict:
    """p50/p99 ms of one forward pass over n rows, per variant and n, interleaved."""
    categorical, multi, numeric = tensors(rows)
    seconds = {name: {n: [] for n in BATCHES} for name in models}
    with torch.inference_mode():
        for _ in range(repetitions):
            for n in BATCHES:
                take = torch.randint(0, len(categorical), (n,))
                inputs = (categorical[take], multi[take], numeric[take])
                for name, model in models.items():
                    started = time.perf_counter()
                    model(*inputs)
                    seconds[name][n].append(time.perf_counter() - started)
    return {
        name: {
            str(n): {
                "p50_ms": round(float(np.percentile(s, 50)) * 1e3, 3),
                "p99_ms": round(float(np.percentile(s, 99)) * 1e3, 3),
            }
            for n, s in by_n.items()
        }
        for name, by_n in seconds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 epochs, at most 40k training rows, fewer repetitions",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument(
        "--rank", type=int, default=4, help="embedding rank of every compressed variant"
    )
    parser.add_argument(
        "--dense-keep",
        type=float,
        default=0.3,
        help="share of each compressed dense layer's weights kept",
    )
    parser.add_argument(
        "--explained-variance",
        type=float,
        help="ranks keep this share of variance instead of --rank/--dense-keep; "
        "the factorised model takes output-feature compression's embedding rank",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_config = CtrTrainConfig(epochs=2 if args.quick else 20)
    compression = CompressionConfig(args.rank, args.dense_keep, args.explained_variance)
    repetitions, resamples, max_train = (20, 100, 40_000) if args.quick else (200, 500, None)
    found = datasets(args.data)
    if not found:
        sys.exit(f"no data under {args.data}: needs movielens-100k and/or criteo-kaggle-8k")
    results = {
        "compression": compression.__dict__,
        "epochs": train_config.epochs,
        "latency_repetitions": repetitions,
        "bootstrap_resamples": resamples,
        "rows": [],
    }
    for dataset, (fields, splits) in found.items():
        train, dev, test = (fields.encode(splits[s]) for s in ("train", "dev", "test"))
        if max_train and len(train) > max_train:  # --quick: a sample of the training rows
            train = train.take(
                np.sort(np.random.default_rng(0).choice(len(train), max_train, replace=False))
            )
        calibration = train.take(
            np.random.default_rng(0).choice(len(train), min(4096, len(train)), replace=False)
        )
        for model_name in ("deepfm", "dcn_v2"):
            print(
                f"\n{dataset} / {model_name}: {len(train):,} train, {len(dev):,} dev, {len(test):,} test rows",
                flush=True,
            )
            models, epochs, plans = {"uncompressed": build(model_name, fields, None)}, {}, {}
            epochs["uncompressed"] = train_ctr(
                models["uncompressed"], train, dev, train_config, f"{model_name} uncompressed"
            )["best"]["epoch"]
            for method in ("output_features", "weight_svd"):
                models[method], plans[method] = compress(
                    models["uncompressed"], method, compression, tensors(calibration)
                )
            models["factorised"] = build(
                model_name, fields, plans["output_features"].embedding_rank
            )
            epochs["factorised"] = train_ctr(
                models["factorised"], train, dev, train_config, f"{model_name} factorised"
            )["best"]["epoch"]
            quality = bootstrap(
                test.labels,
                {name: predict(m, test) for name, m in models.items()},
                np.random.default_rng(0),
                resamples,
            )
            speed = latencies(models, test, repetitions)
            sizes = {name: model_bytes(m) for name, m in models.items()}
            for name in VARIANTS:
                results["rows"].append(
                    {
                        "dataset": dataset,
                        "model": model_name,
                        "variant": name,
                        "best_epoch": epochs.get(name),
                        "plan": plans[name].to_json()
                        if name in plans
                        else {"embedding_rank": models[name].fields.layout.rank, "layers": {}},
                        "bytes": sizes[name],
                        "ratio": round(sizes["uncompressed"]["total"] / sizes[name]["total"], 2),
                        **quality[name],
                        "latency": speed[name],
                        "speedup_256": round(
                            speed["uncompressed"]["256"]["p50_ms"] / speed[name]["256"]["p50_ms"], 2
                        ),
                        "speedup_1024": round(
                            speed["uncompressed"]["1024"]["p50_ms"] / speed[name]["1024"]["p50_ms"],
                            2,
                        ),
                    }
                )
    budget = (
        f"variance kept {args.explained_variance}"
        if args.explained_variance
        else f"embedding rank {args.rank}, dense layers keep {args.dense_keep}"
    )
    print(f"\n{budget}; test split; 95% bootstrap intervals")
    print(
        "| data | model | variant | ranks: emb; dense | emb KiB | dense KiB | total KiB | × smaller | AUC [95% "
        "CI] | ΔAUC [95% CI] | logloss | p50 ms @1 / 64 / 256 / 1024 | speedup @256 / 1024 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        b, lat, plan = r["bytes"], r["latency"], r["plan"]
        ranks = (
            f"{plan['embedding_rank']}; {', '.join(str(v) for v in plan['layers'].values())}"
            if plan["embedding_rank"]
            else ""
        )
        print(
            f"| {r['dataset']} | {r['model']} | {r['variant']} | {ranks} | {b['embeddings'] / 1024:.0f} | "
            f"{b['dense'] / 1024:.0f} | {b['total'] / 1024:.0f} "
            f"| {r['ratio']} | {r['auc']:.4f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] | {r['delta_auc']:+.4f} "
            f"[{r['delta_auc_ci'][0]:+.4f}, {r['delta_auc_ci'][1]:+.4f}] "
            f"| {r['logloss']:.4f} | {' / '.join(str(lat[str(n)]['p50_ms']) for n in BATCHES)} | "
            f"{r['speedup_256']} / {r['speedup_1024']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
