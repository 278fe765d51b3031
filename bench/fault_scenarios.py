"""Fault scenarios against the distributed topology under a bounded load loop: the table of
docs/reliability.md.

    python bench/fault_scenarios.py [--quick] [--json PATH] [--clients N] [--items N]

Trains a synthetic artifact and a second model version (what a model rollout serves), starts
Redis (AOF, appendfsync always), one retrieval and one ranking replica (each behind a proxy
that can delay it; a second slot per tier for rollouts), the online trainer and the gateway
as real processes on loopback (`service.testing.stack`), then runs each scenario of
`service.testing.faults` while N clients (default 4) send recommendations (deadline 500 ms)
and click events. Per scenario: requests sent, answered, degraded, failed, shed; events
acknowledged, found in the log, processed by the trainer; recovery time (from the fault's
end to the last answer worse than ok) and the slowest answer past its deadline.
--quick runs three of the scenarios on a smaller artifact, within 2 minutes.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.bundle import ModelBundle  # noqa: E402
from service.data.synthetic import SyntheticConfig, generate  # noqa: E402
from service.testing.faults import (  # noqa: E402
    HOT_SWAP_DEADLINE_MS,
    IN_FLIGHT_LIMIT,
    OVERLOAD_CLIENTS,
    fault_stack,
    hot_swap,
    overload,
    redis_restart,
    run_scenario,
    sigterm_tier,
    slow_tier,
    tier_killed,
    trainer_crash,
)
from service.training.artifact import TrainConfig, train_and_save  # noqa: E402


def scenarios(new_model: Path, quick: bool, clients: int) -> list[tuple[str, str, object, dict]]:
    every = [
        ("redis_restart", "Redis SIGKILL, 2 s away, restarted (AOF replayed)", redis_restart, {}),
        ("ranking_killed", "ranking SIGKILL, restarted 4 s later", tier_killed("ranking"), {}),
        (
            "retrieval_killed",
            "retrieval SIGKILL, restarted 4 s later",
            tier_killed("retrieval"),
            {},
        ),
        ("ranking_slow", "ranking answers held back 500 ms for 5 s", slow_tier("ranking", 0.5), {}),
        (
            "hot_swap",
            "new index version + admin reload, ranking rolled to a new model",
            hot_swap(new_model),
            {"deadline_ms": HOT_SWAP_DEADLINE_MS},
        ),
        (
            "retrieval_sigterm",
            "retrieval replica SIGTERM after a second one serves",
            sigterm_tier("retrieval"),
            {},
        ),
        (
            "ranking_sigterm",
            "ranking replica SIGTERM after a second one serves",
            sigterm_tier("ranking"),
            {},
        ),
        ("trainer_crash", "online trainer SIGKILL, restarted 2 s later", trainer_crash, {}),
        (
            "overload",
            f"{OVERLOAD_CLIENTS} clients, no pause, in-flight limit {IN_FLIGHT_LIMIT}",
            overload,
            {"clients": OVERLOAD_CLIENTS, "pause_seconds": 0.0},
        ),
    ]
    chosen = {"redis_restart", "ranking_killed", "trainer_crash"} if quick else None
    return [
        (n, f, s, {"clients": clients, **load})
        for n, f, s, load in every
        if chosen is None or n in chosen
    ]


def table(rows: list[dict]) -> str:
    lines = [
        "| scenario | fault | sent | answered | degraded | failed | shed | events acked | in log | processed | "
        "recovery s | slowest − deadline ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        recovery = "-" if r["recovery_seconds"] is None else f"{r['recovery_seconds']:.2f}"
        lines.append(
            f"| {r['scenario']} | {r['fault']} | {r['sent']} | {r['answered']} | {r['degraded']} | {r['failed']} | "
            f"{r['shed']} "
            f"| {r['events_acked']} | {r['events_logged']} | {r['events_processed']} | {recovery} | "
            f"{r['slowest_over_deadline_ms']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three scenarios, 2,000 items")
    parser.add_argument("--items", type=int)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    items = args.items or (2_000 if args.quick else 20_000)

    work = Path(tempfile.mkdtemp(prefix="recsys-faults-"))
    data = generate(
        SyntheticConfig(
            users=items // 4, items=items, categories=16, interactions_per_user=(10, 30), seed=3
        )
    )
    config = TrainConfig()
    config = replace(
        config,
        two_tower=replace(config.two_tower, epochs=2),
        ranker=replace(config.ranker, epochs=1),
    )
    started = time.monotonic()
    train_and_save(data, str(work / "artifacts"), config)
    new_model = train_and_save(
        data, str(work / "retrained"), replace(config, ranker=replace(config.ranker, seed=1))
    )
    print(f"trained two model versions in {time.monotonic() - started:.0f}s", flush=True)
    bundle = ModelBundle.load(work / "artifacts")
    known = bundle.features.users.ids
    users = np.concatenate(
        [
            known[: max(1, len(known) * 9 // 10)],
            np.arange(10**9, 10**9 + len(known) // 10, dtype=np.uint64),
        ]
    )

    stack = fault_stack(work / "artifacts", "bench-fault-scenarios-token")
    rows = []
    try:
        stack.start()
        chosen = scenarios(new_model, args.quick, args.clients)
        for number, (name, fault, scenario, load) in enumerate(chosen, 1):
            began = time.monotonic()
            result = run_scenario(
                stack, name, fault, scenario, users, bundle.features.items.ids, **load
            )
            rows.append(result.row())
            print(
                f"[{number}/{len(chosen)}] {name}: sent {result.sent}, degraded {result.degraded}, failed "
                f"{result.failed}, "
                f"events {result.events_acked} acked / {result.events_processed} processed "
                f"({time.monotonic() - began:.0f}s)",
                flush=True,
            )
    finally:
        stack.close()
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"items": items, "clients": args.clients, "deadline_ms": 500.0, "scenarios": rows},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
