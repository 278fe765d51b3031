"""Faults injected into the distributed topology (separate processes on loopback, Redis with
AOF `appendfsync always`) while a bounded load loop runs: every request is answered (degraded
while a part is away, never failed), the stack recovers by itself, and no event the gateway
acknowledged is lost. `bench/fault_scenarios.py` runs the same scenarios for the table in
docs/reliability.md."""

import shutil

import numpy as np
import pytest

from service.testing.faults import (
    HOT_SWAP_DEADLINE_MS,
    HTTP_SLACK_SECONDS,
    OVERLOAD_CLIENTS,
    ScenarioResult,
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
from service.training.artifact import train_and_save
from tests.conftest import tiny_train_config


@pytest.fixture(scope="module")
def stack(artifact_root, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("fault-artifacts") / "artifacts"
    shutil.copytree(artifact_root, artifacts)  # the hot swap writes an index version into it
    stack = fault_stack(artifacts, "fault-scenario-admin-token")
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def load_ids(bundle) -> tuple[np.ndarray, np.ndarray]:
    users = np.concatenate(
        [bundle.features.users.ids[:150], np.arange(10**9, 10**9 + 15, dtype=np.uint64)]
    )  # 10% cold
    return users, bundle.features.items.ids


@pytest.fixture(scope="module")
def retrained_model(tmp_path_factory, tiny_dataset):
    """A second model version, in its own root: what a rollout of a new model serves."""
    folder = train_and_save(
        tiny_dataset, str(tmp_path_factory.mktemp("retrained")), tiny_train_config()
    )
    return folder


def run(stack, load_ids, name, scenario, **load) -> ScenarioResult:
    result = run_scenario(stack, name, name, scenario, *load_ids, **load)
    print(result.row())
    assert result.sent > 100, "the load loop barely ran"
    assert result.failed == 0, result.row()
    # Every acknowledged event is in the log and was processed by the trainer.
    assert result.events_acked > 0
    assert result.events_logged == result.events_processed == result.events_acked, result.row()
    assert result.slowest_over_deadline_ms < HTTP_SLACK_SECONDS * 1000, (
        "an answer far past its deadline: a hang"
    )
    return result


def test_redis_killed_and_restarted(stack, load_ids):
    result = run(stack, load_ids, "redis_restart", redis_restart)
    assert result.degraded > 0  # lookups fell back while Redis was away
    assert result.events_refused > 0  # and events were refused (503), not acknowledged and lost
    assert result.recovery_seconds is not None


@pytest.mark.parametrize("tier", ["ranking", "retrieval"])
def test_a_tier_killed_is_served_by_its_fallback_and_its_breaker_opens_then_closes(
    stack, load_ids, tier
):
    result = run(stack, load_ids, f"{tier}_killed", tier_killed(tier))
    assert result.degraded > 0
    assert result.observed["breaker_opened"] and result.observed["breaker_closed_again"], (
        result.observed
    )


def test_a_slow_tier_meets_its_deadlines_with_the_fallback(stack, load_ids):
    result = run(stack, load_ids, "ranking_slow", slow_tier("ranking", 0.5))
    assert result.degraded > 0
    assert result.observed["breaker_opened"] and result.observed["breaker_closed_again"], (
        result.observed
    )


def test_index_and_model_hot_swap_under_load(stack, load_ids, retrained_model):
    result = run(
        stack, load_ids, "hot_swap", hot_swap(retrained_model), deadline_ms=HOT_SWAP_DEADLINE_MS
    )
    assert result.degraded == 0
    assert result.observed["index_swapped"] and result.observed["old_exit_code"] == 0, (
        result.observed
    )


@pytest.mark.parametrize("tier", ["retrieval", "ranking"])
def test_sigterm_during_load_loses_no_request(stack, load_ids, tier):
    result = run(stack, load_ids, f"{tier}_sigterm", sigterm_tier(tier))
    assert result.degraded == 0  # in-flight calls finished, new ones went to the other replica
    assert result.observed["old_exit_code"] == 0


def test_online_trainer_killed_mid_load_processes_every_acknowledged_event(stack, load_ids):
    run(stack, load_ids, "trainer_crash", trainer_crash)


def test_overload_is_shed_at_once_and_nothing_fails(stack, load_ids):
    result = run(stack, load_ids, "overload", overload, clients=OVERLOAD_CLIENTS, pause_seconds=0.0)
    assert result.shed > 0
