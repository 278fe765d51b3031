"""An online trainer that crashes mid-batch and a new one that reads the batch again leave the
tables exactly as one trainer processing every batch once does: the same vectors, optimizer
state, admission counts, interest rows and recent items, on a real redis-server, at every
crash point; and a trainer restarted between batches continues the rows' optimizer state."""

import uuid

import numpy as np
import pytest

from service.artifact_tables import open_store
from service.bundle import ModelBundle
from service.embeddings.tables import (
    INTEREST_TABLE,
    ITEM_STATE_TABLE,
    ITEM_TABLE,
    USER_STATE_TABLE,
    USER_TABLE,
)
from service.online.parts import open_online
from service.online.runtime import make_trainer
from service.online.streams import event_fields
from service.online.trainer import OnlineTrainerConfig
from service.schemas import Event
from service.settings import Settings

NEW_ITEMS = [9_000_000_001, 9_000_000_002]
NEW_USERS = [8_000_000_001, 8_000_000_002]
BATCH = 8


class Crash(Exception):
    """The process died here."""


def events(bundle: ModelBundle) -> list[Event]:
    rng = np.random.default_rng(5)
    users = [*map(int, bundle.features.users.ids[:6]), *NEW_USERS]
    items = [*map(int, bundle.features.items.ids[:20]), *NEW_ITEMS]
    return [
        Event(
            user_id=int(rng.choice(users)),
            item_id=int(rng.choice(items)),
            type=str(rng.choice(["click", "click", "impression"])),
            timestamp=1.7e9 + n,
        )
        for n in range(4 * BATCH)
    ]


class Tables:
    """One namespace's online parts, wired as `recsys online-train` wires them."""

    def __init__(self, artifact_root, redis_url: str, namespace: str):
        self.settings = Settings(
            artifacts=artifact_root,
            redis_url=redis_url,
            redis_namespace=namespace,
            events_stream=f"events-{namespace}",
            embedding_cache_entries=0,
            online_batch_events=BATCH,
            trainer_consumer="trainer-0",
        )
        self.bundle = ModelBundle.load(artifact_root)
        self.store = open_store(self.settings, self.bundle)
        self.online = open_online(self.settings, self.store)
        self.trainer = make_trainer(self.settings, self.bundle, self.store, self.online)
        self.trainer.config = type(self.trainer.config)(
            **{**self.trainer.config.__dict__, "block_seconds": 0}
        )

    def append(self, logged: list[Event]) -> None:
        """The same entry ids in every namespace: the trainer seeds its sampling by them."""
        for n, event in enumerate(logged, 1):
            self.store.client.xadd(
                self.settings.events_stream, event_fields(event, 0.0), id=f"{n}-0"
            )

    def drain(self) -> None:
        while self.online.trainer_events.backlog():
            self.trainer.step()

    def state(self, logged: list[Event]) -> dict:
        users = np.unique(np.array([e.user_id for e in logged], np.uint64))
        items = np.unique(np.array([e.item_id for e in logged], np.uint64))
        return {
            "user": self.store.get_many(USER_TABLE, users).vectors,
            "item": self.store.get_many(ITEM_TABLE, items).vectors,
            "item_found": self.store.get_many(ITEM_TABLE, items).found,
            "interest": self.store.get_many(INTEREST_TABLE, users).vectors,
            "user_state": self.store.get_many(USER_STATE_TABLE, users).vectors,
            "item_state": self.store.get_many(ITEM_STATE_TABLE, items).vectors,
            "user_counts": self.store.counts(USER_TABLE, users)[0],
            "item_counts": self.store.counts(ITEM_TABLE, items)[0],
            "recent": [r.tolist() for r in self.online.recent.get_many(users)],
        }

    def close(self) -> None:
        self.online.stop()
        self.store.close()


def drained_by_a_new_process(artifact_root, redis_url: str, namespace: str, logged) -> dict:
    """The tables after a new trainer process (same consumer name) drained the log."""
    restarted = Tables(artifact_root, redis_url, namespace)
    restarted.drain()
    state = restarted.state(logged)
    restarted.close()
    return state


def crash_on_call(owner, method: str, call: int = 1) -> None:
    """Make `owner.method` raise `Crash` on its `call`-th call, after the calls before it ran."""
    real, calls = getattr(owner, method), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Crash(method)
        return real(*args, **kwargs)

    setattr(owner, method, crashing)


CRASH_POINTS = {
    "before the record is saved": lambda t: crash_on_call(t.trainer.journal, "save"),
    "after the record, before any write": lambda t: crash_on_call(t.store, "add_counts"),
    "between the user and item counts": lambda t: crash_on_call(t.store, "add_counts", call=2),
    "after the user rows, before the item rows": lambda t: crash_on_call(
        t.store, "put_many", call=2
    ),
    "after the vectors, before their optimizer state": lambda t: crash_on_call(
        t.store, "put_many", call=4
    ),
    "after the rows, before the recent items": lambda t: crash_on_call(t.online.recent, "push"),
    "after every write, before the ack": lambda t: crash_on_call(t.online.trainer_events, "ack"),
}


@pytest.fixture(scope="module")
def reference(artifact_root, redis_server):
    tables = Tables(artifact_root, redis_server.url, uuid.uuid4().hex[:8])
    logged = events(tables.bundle)
    tables.append(logged)
    tables.drain()
    yield tables.state(logged), logged
    tables.close()


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_batch_replayed_after_a_crash_writes_what_one_pass_writes(
    artifact_root, redis_server, reference, point
):
    expected, logged = reference
    assert (
        any(len(r) for r in expected["recent"]) and expected["item_found"].any()
    )  # the batches did write
    namespace = uuid.uuid4().hex[:8]
    crashed = Tables(artifact_root, redis_server.url, namespace)
    crashed.append(logged)
    crashed.trainer.step()  # one whole batch first: the crash falls in the second
    CRASH_POINTS[point](crashed)
    with pytest.raises(Crash):
        crashed.trainer.step()
    crashed.close()

    restarted = Tables(
        artifact_root, redis_server.url, namespace
    )  # a new process, the same consumer name
    assert restarted.online.trainer_events.backlog() == len(logged) - BATCH
    restarted.drain()
    state = restarted.state(logged)
    restarted.close()
    for key, value in expected.items():
        assert (
            np.array_equal(np.asarray(state[key]), np.asarray(value))
            if key != "recent"
            else state[key] == value
        ), key


def test_a_crash_between_adding_counts_and_marking_them_counts_that_batch_twice(
    artifact_root, redis_server, reference
):
    """The one step a replay repeats: the counts were added, the process died before the
    record said so. Vectors, interests and recent items still match one pass."""
    expected, logged = reference
    namespace = uuid.uuid4().hex[:8]
    crashed = Tables(artifact_root, redis_server.url, namespace)
    crashed.append(logged)
    crashed.trainer.step()
    add_counts = crashed.store.add_counts

    def added_then_crashed(table, ids):
        add_counts(table, ids)
        raise Crash("after add_counts")

    crashed.store.add_counts = added_then_crashed
    with pytest.raises(Crash):
        crashed.trainer.step()
    crashed.close()

    state = drained_by_a_new_process(artifact_root, redis_server.url, namespace, logged)
    second = np.array([e.user_id for e in logged[BATCH : 2 * BATCH]], np.uint64)
    users = np.unique(np.array([e.user_id for e in logged], np.uint64))
    twice = np.array([np.count_nonzero(second == u) for u in users])
    assert twice.sum() == BATCH
    assert np.array_equal(state["user_counts"], expected["user_counts"] + twice)
    for key in ("user", "item", "interest", "user_state", "item_state", "item_counts"):
        assert np.array_equal(state[key], expected[key]), key
    assert state["recent"] == expected["recent"]


def test_a_trainer_restarted_between_batches_continues_each_rows_optimizer_state(
    artifact_root, redis_server, reference
):
    """Adagrad's accumulators live in the table beside the rows: a new process that trains
    the remaining batches ends where one process training them all does (a trainer that
    restarted its optimizer would take larger first steps again)."""
    expected, logged = reference
    trained = expected["user_state"][:, 0] > 0  # users with a state row (clicked, admitted)
    assert trained.any()
    # The accumulators grew past where a row starts (its evidence times the initial value).
    assert (expected["user_state"][trained] > OnlineTrainerConfig().initial_accumulator).all()

    namespace = uuid.uuid4().hex[:8]
    first = Tables(artifact_root, redis_server.url, namespace)
    first.append(logged)
    first.trainer.step()
    first.trainer.step()
    first.close()
    state = drained_by_a_new_process(artifact_root, redis_server.url, namespace, logged)
    for key in ("user", "item", "user_state", "item_state"):
        assert np.array_equal(state[key], expected[key]), key
