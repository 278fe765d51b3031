"""What the quality benchmarks share: their common arguments, the data set they read, and
the short training of `--quick` (each finishes within 2 minutes with it)."""

import argparse
from dataclasses import replace
from pathlib import Path

from service.data.files import load_dataset
from service.data.schema import Dataset
from service.training.artifact import TrainConfig

QUICK_SYNTHETIC = "synthetic:users=500,items=800,categories=12"


def quality_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument(
        "--quick", action="store_true", help="a small synthetic set and short training"
    )
    parser.add_argument("--json", type=Path)
    return parser


def bench_dataset(args: argparse.Namespace) -> Dataset:
    quick = args.quick and args.dataset == "synthetic"
    return load_dataset(QUICK_SYNTHETIC if quick else args.dataset)


def bench_config(quick: bool, config: TrainConfig = TrainConfig()) -> TrainConfig:
    if not quick:
        return config
    return replace(
        config,
        two_tower=replace(config.two_tower, epochs=4, sequence_epochs=8),
        ranker=replace(config.ranker, epochs=1),
    )
