"""Fault scenarios against a `LocalStack` under a bounded load loop, each measured the same
way: requests sent, answered, degraded, failed, shed; events acknowledged, found in the log,
processed by the trainer; recovery time. `tests/test_fault_scenarios.py` asserts what each
must show and `bench/fault_scenarios.py` writes the table of docs/reliability.md.

The load loop is what a frontend does: a fixed number of clients, each one request at a
time with a deadline (`X-Deadline-Ms`), mostly recommendations and some click events, each
event for a user id of its own, so every acknowledged event can be found in the log. An
event the gateway refuses (503 while the log is away, 429) is sent again on the client's
next turn, as a client honouring Retry-After does; only a 202 counts as acknowledged.
"""

import itertools
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx2
import numpy as np
import redis

from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.testing.stack import RECSYS, REPLICA_SLOTS, LocalStack

EVENT_USERS_FROM = 1 << 40  # the loop's event user ids: far above any artifact user
HTTP_SLACK_SECONDS = 2.0  # beyond its deadline, an answer this late counts as a hang
IN_FLIGHT_LIMIT = 8  # per process: the overload scenario's clients exceed it, the others' 4 do not
OVERLOAD_CLIENTS = 3 * IN_FLIGHT_LIMIT


MEMORY_FOLDER = Path("/dev/shm")


def fault_stack(artifacts: Path, admin_token: str) -> LocalStack:
    """The stack the scenarios run on: Redis writing every write to its AOF before it replies
    (so an acknowledged event survives a kill), and the in-flight limit the overload scenario
    exceeds. The AOF goes to tmpfs where the machine has one: a killed process loses nothing
    either way, and on a disk shared with the whole test run an fsync can stall Redis's main
    thread past a request's deadline, which is the disk's latency, not the topology's."""
    return LocalStack(
        artifacts,
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        admin_token=admin_token,
        env={"RECSYS_MAX_IN_FLIGHT": str(IN_FLIGHT_LIMIT)},
        redis_parent=MEMORY_FOLDER if MEMORY_FOLDER.is_dir() else None,
    )


@dataclass(frozen=True)
class Answer:
    kind: str  # recommend | events
    sent: float  # time.monotonic()
    done: float
    outcome: str  # ok | degraded | shed | refused (events: not appended, retry) | failed
    event_user: int | None = None


class LoadLoop:
    """`clients` threads against the gateway until `stop()`; `share_events` of the calls post one click."""

    def __init__(
        self,
        url: str,
        users: np.ndarray,
        items: np.ndarray,
        clients: int = 4,
        deadline_ms: float = 500.0,
        share_events: float = 0.3,
        pause_seconds: float = 0.01,
        seed: int = 0,
    ):
        self.url = url
        self.users = users
        self.items = items
        self.clients = clients
        self.deadline_ms = deadline_ms
        self.share_events = share_events
        self.pause_seconds = pause_seconds
        self.seed = seed
        self.answers: list[Answer] = []
        self.unacked: set[int] = set()  # event users refused and not yet sent again with success
        self._event_users = itertools.count(EVENT_USERS_FROM)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "LoadLoop":
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True)
            for n in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def run_for(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _client(self, number: int) -> None:
        rng = np.random.default_rng(self.seed + number)
        timeout = self.deadline_ms / 1000 + HTTP_SLACK_SECONDS + 3
        retry: list[int] = []
        with httpx2.Client(base_url=self.url, timeout=timeout) as http:
            while not self._stop.is_set():
                if rng.random() < self.share_events:
                    user = retry.pop() if retry else next(self._event_users)
                    answer = self._send_event(http, user, int(rng.choice(self.items)))
                    if answer.outcome != "ok":
                        retry.append(user)
                else:
                    answer = self._recommend(http, int(rng.choice(self.users)))
                with self._lock:
                    self.answers.append(answer)
                    if answer.event_user is not None:
                        (self.unacked.discard if answer.outcome == "ok" else self.unacked.add)(
                            answer.event_user
                        )
                self._stop.wait(self.pause_seconds)

    def _recommend(self, http: httpx2.Client, user: int) -> Answer:
        sent = time.monotonic()
        try:
            reply = http.post(
                "/v1/recommend",
                json={"user_id": user, "k": 10},
                headers={"X-Deadline-Ms": str(self.deadline_ms)},
            )
            outcome = (
                ("degraded" if reply.json()["degraded"] else "ok")
                if reply.status_code == 200
                else "shed"
                if reply.status_code == 429
                else "failed"
            )
        except httpx2.HTTPError:
            outcome = "failed"
        return Answer("recommend", sent, time.monotonic(), outcome)

    def _send_event(self, http: httpx2.Client, user: int, item: int) -> Answer:
        sent = time.monotonic()
        try:
            reply = http.post(
                "/v1/events", json={"events": [{"user_id": user, "item_id": item, "type": "click"}]}
            )
            outcome = {202: "ok", 503: "refused", 429: "shed"}.get(reply.status_code, "failed")
        except httpx2.HTTPError:
            outcome = "failed"
        return Answer("events", sent, time.monotonic(), outcome, user)


@dataclass
class ScenarioResult:
    scenario: str
    fault: str
    sent: int = 0
    answered: int = 0
    degraded: int = 0
    failed: int = 0
    shed: int = 0
    events_refused: int = 0  # 503/429 answers to events, sent again later
    events_acked: int = 0
    events_logged: int = 0  # acknowledged events found in the log afterwards
    events_processed: int = 0  # of those, delivered to and acked by the trainer
    recovery_seconds: float | None = None
    slowest_over_deadline_ms: float = 0.0  # the slowest recommendation minus its deadline
    observed: dict = field(default_factory=dict)

    def row(self) -> dict:
        return asdict(self)


def summarise(
    name: str, fault: str, answers: list[Answer], deadline_ms: float, restored_at: float | None
) -> ScenarioResult:
    result = ScenarioResult(name, fault, sent=len(answers))
    recommends = [a for a in answers if a.kind == "recommend"]
    events = [a for a in answers if a.kind == "events"]
    result.answered = sum(a.outcome in ("ok", "degraded") for a in recommends) + sum(
        a.outcome == "ok" for a in events
    )
    result.degraded = sum(a.outcome == "degraded" for a in recommends)
    result.failed = sum(a.outcome == "failed" for a in answers)
    result.shed = sum(a.outcome == "shed" for a in answers)
    result.events_refused = sum(a.outcome in ("refused", "shed") for a in events)
    result.events_acked = sum(a.outcome == "ok" for a in events)
    if recommends:
        result.slowest_over_deadline_ms = max(
            (a.done - a.sent) * 1000 - deadline_ms for a in recommends
        )
    if restored_at is not None:
        # Recovered once the answers stop being worse than ok: the last bad answer sent after the fix.
        late = [a.done for a in recommends if a.sent >= restored_at and a.outcome != "ok"]
        result.recovery_seconds = max(late) - restored_at if late else 0.0
    return result


class EventAudit:
    """What the event log holds and what the trainer's group has consumed, read from Redis."""

    def __init__(self, stack: LocalStack):
        self.stack = stack

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.stack.redis.url, socket_timeout=5)

    def backlog(self) -> int:
        with self._client() as client:
            for group in client.xinfo_groups(self.stack.events_stream):
                if group["name"].decode() == self.stack.event_group:
                    return int(group["lag"] or 0) + int(group["pending"])
        return 0

    def wait_drained(self, timeout: float = 120.0) -> float:
        """Until the trainer has acked everything in the log; returns how long that took."""
        started = time.monotonic()
        while self.backlog():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"trainer backlog still {self.backlog()} after {timeout}s")
            time.sleep(0.2)
        return time.monotonic() - started

    def count(self, acked_users: set[int]) -> tuple[int, int]:
        """(acked events found in the log, of those delivered to the group and not pending)."""
        with self._client() as client:
            group = next(
                g
                for g in client.xinfo_groups(self.stack.events_stream)
                if g["name"].decode() == self.stack.event_group
            )
            delivered_to = group["last-delivered-id"].decode()
            pending = {
                p["message_id"].decode()
                for p in client.xpending_range(
                    self.stack.events_stream, self.stack.event_group, "-", "+", 100_000
                )
            }
            logged, processed = set(), set()  # a retried event may be in the log twice: count users
            for entry_id, fields in client.xrange(self.stack.events_stream):
                user = int(fields[b"user"])
                if user in acked_users:
                    logged.add(user)
                    entry = entry_id.decode()
                    if stream_id(entry) <= stream_id(delivered_to) and entry not in pending:
                        processed.add(user)
        return len(logged), len(processed)


def stream_id(entry: str) -> tuple[int, int]:
    milliseconds, sequence = entry.split("-")
    return int(milliseconds), int(sequence)


def gateway_metric(stack: LocalStack, line_start: str) -> float:
    """The value of the gateway's first /metrics line that starts with `line_start`."""
    for line in httpx2.get(f"{stack.gateway_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class BreakerWatch:
    """Samples the gateway's breaker gauge of `tier` while a scenario runs: did it open, did it close again."""

    def __init__(self, stack: LocalStack, tier: str):
        self.stack, self.tier = stack, tier
        self.states: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "BreakerWatch":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.states.append(
                (
                    time.monotonic(),
                    gateway_metric(self.stack, f'recsys_tier_breaker_open{{tier="{self.tier}"}}'),
                )
            )
            self._stop.wait(0.1)

    def opened_then_closed(self) -> dict:
        opened = [t for t, open_ in self.states if open_]
        closed_after = [t for t, open_ in self.states if not open_ and opened and t > opened[0]]
        return {
            "breaker_opened": bool(opened),
            "breaker_closed_again": bool(closed_after) and not self.states[-1][1],
        }


def admin_reload_index(stack: LocalStack, slot: int = 0) -> pb.ReloadIndexResponse:
    replica = stack.replicas[("retrieval", slot)]
    with grpc.insecure_channel(f"127.0.0.1:{replica.grpc_port}") as channel:
        return pb_grpc.AdminStub(channel).ReloadIndex(
            pb.ReloadIndexRequest(),
            metadata=(("authorization", f"Bearer {stack.admin_token}"),),
            timeout=60,
        )


def tier_calls(stack: LocalStack, tier: str, slot: int) -> float:
    replica = stack.replicas[(tier, slot)]
    endpoint = "Retrieve" if tier == "retrieval" else "Rank"
    text = httpx2.get(f"http://127.0.0.1:{replica.http_port}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("recsys_requests_total{") and f'endpoint="{endpoint}"' in line
    )


def roll(stack: LocalStack, tier: str, artifacts: Path | None = None) -> dict:
    """A rolling replacement of `tier`'s replica: start one in the free slot, wait until the
    gateway sends it calls, then SIGTERM the old one (NOT_SERVING, drain, exit)."""
    old = next(slot for slot in range(REPLICA_SLOTS) if (tier, slot) in stack.replicas)
    new = next(slot for slot in range(REPLICA_SLOTS) if (tier, slot) not in stack.replicas)
    stack.start_replica(tier, new, artifacts)
    deadline = time.monotonic() + 30
    while tier_calls(stack, tier, new) == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway sent no call to the new {tier} replica in 30s")
        time.sleep(0.1)
    return {"old_exit_code": stack.stop_replica(tier, old, signal.SIGTERM), "new_slot": new}


Scenario = Callable[[LocalStack, LoadLoop], tuple[float | None, dict]]


def redis_restart(stack: LocalStack, load: LoadLoop) -> tuple[float | None, dict]:
    load.run_for(3)
    restored = stack.restart_redis(down_seconds=2)
    load.run_for(8)
    return restored, {}


def tier_killed(tier: str) -> Scenario:
    def scenario(stack: LocalStack, load: LoadLoop) -> tuple[float | None, dict]:
        slot = next(s for s in range(REPLICA_SLOTS) if (tier, s) in stack.replicas)
        with BreakerWatch(stack, tier) as watch:
            load.run_for(2)
            stack.stop_replica(tier, slot, signal.SIGKILL)
            load.run_for(4)
            stack.start_replica(tier, slot)
            restored = time.monotonic()
            load.run_for(6)
        return restored, watch.opened_then_closed()

    return scenario


def slow_tier(tier: str, delay_seconds: float) -> Scenario:
    def scenario(stack: LocalStack, load: LoadLoop) -> tuple[float | None, dict]:
        with BreakerWatch(stack, tier) as watch:
            load.run_for(2)
            for proxy in stack.proxies[tier]:
                proxy.delay = delay_seconds
            load.run_for(5)
            for proxy in stack.proxies[tier]:
                proxy.delay = 0.0
            restored = time.monotonic()
            load.run_for(6)
        return restored, watch.opened_then_closed()

    return scenario


# The hot swap starts two cold processes (the index build, a ranking replica on a new model)
# on the two cores the stack and its load share; a deployment starts them on other nodes.
# Their start-up can hold a core for a second, so its clients allow a second.
HOT_SWAP_DEADLINE_MS = 1000.0


def hot_swap(new_model: Path) -> Scenario:
    """A new index version built from the live table and swapped in by the admin call, then
    the ranking tier rolled onto a newly trained model, all under load."""

    def scenario(stack: LocalStack, load: LoadLoop) -> tuple[float | None, dict]:
        load.run_for(2)
        # The build is a batch job, which a deployment runs beside the serving pods rather than
        # on their CPUs; here it shares two cores with them, so it yields to them.
        subprocess.run(
            ["nice", "-n", "19", str(RECSYS), "index", "build", "--factory", "Flat"],
            env=stack.env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
        )
        swapped = admin_reload_index(stack)
        load.run_for(2)
        rolled = roll(stack, "ranking", new_model)
        load.run_for(3)
        return None, {
            "index_swapped": swapped.swapped,
            "index_version": swapped.index_version,
            **rolled,
        }

    return scenario


def sigterm_tier(tier: str) -> Scenario:
    def scenario(stack: LocalStack, load: LoadLoop) -> tuple[float | None, dict]:
        load.run_for(2)
        rolled = roll(stack, tier)
        load.run_for(3)
        return None, rolled

    return scenario


def trainer_crash(stack: LocalStack, load: LoadLoop) -> tuple[float | None, dict]:
    load.run_for(3)
    stack.kill_trainer()
    load.run_for(2)  # events keep arriving while no trainer runs
    stack.start_trainer()
    load.run_for(4)
    return None, {}


def overload(stack: LocalStack, load: LoadLoop) -> tuple[float | None, dict]:
    load.run_for(5)
    return None, {}


def run_scenario(
    stack: LocalStack,
    name: str,
    fault: str,
    scenario: Scenario,
    users: np.ndarray,
    items: np.ndarray,
    clients: int = 4,
    pause_seconds: float = 0.01,
    deadline_ms: float = 500.0,
    seed: int = 0,
) -> ScenarioResult:
    """Run `scenario` under a load loop, then let the trainer drain and count the events."""
    load = LoadLoop(
        stack.gateway_url,
        users,
        items,
        clients,
        deadline_ms,
        pause_seconds=pause_seconds,
        seed=seed,
    )
    with load:
        restored, observed = scenario(stack, load)
    result = summarise(name, fault, load.answers, deadline_ms, restored)
    result.observed = {**observed, "events_unacked_at_stop": len(load.unacked)}
    audit = EventAudit(stack)
    result.observed["trainer_drain_seconds"] = round(audit.wait_drained(), 2)
    acked = {a.event_user for a in load.answers if a.kind == "events" and a.outcome == "ok"}
    result.events_logged, result.events_processed = audit.count(acked)
    return result
