"""Served-list logging: what each answer showed, so that training can join impressions and
clicks to what was served (the items, scores, sources, rules and model version) instead
of reconstructing it: the training-serving skew Feast's feature logging answers.

Every answer carries a `request_id`; events may send it back. With logging on
(`RECSYS_SERVED_LOG`: `redis` or `parquet`, `RECSYS_SERVED_LOG_SAMPLE` of the requests,
chosen by the request id so a replay samples alike), each answer goes on a bounded queue
as it is, and a background thread wakes once per `flush_seconds` to turn what queued into
served lists and write them in one batch: the request path only enqueues, and the writer
takes the GIL once a second rather than once a request. A queue that is full (the sink is
down or slower than the traffic) drops the list and counts it
(`recsys_served_lists_total{outcome="dropped"}`): a log of what was shown never slows or
fails an answer.

Sinks:
- Redis: one stream (`RECSYS_SERVED_LOG_STREAM`, capped at about `RECSYS_SERVED_LOG_MAX_LENGTH`
  entries), one entry per list: fields `request`, `user` (decimal), `items` (little-endian
  uint64, concatenated), `scores` (little-endian float32), `sources` (comma-separated),
  `model`, `rules` (comma-separated), `context` (JSON, or empty), `ts` (Unix seconds),
  `experiment` and `arm` (empty outside an experiment).
- Parquet: files under `RECSYS_SERVED_LOG_DIR`, one per batch written (at most every
  `flush_seconds`), named `served-<UTC time>-<pid>-<n>.parquet`, columns `request_id`,
  `user_id`, `item_ids`, `scores`, `sources`, `model_version`, `rules`, `context`,
  `timestamp`, `experiment`, `arm`.
"""

import json
import logging
import os
import queue
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.embeddings.redis_store import RedisStoreConfig, connect
from service.metrics import SERVED_LISTS
from service.settings import Settings

log = logging.getLogger(__name__)

BATCH = 512
# The experiment and arm the request being answered is in (set by the experiment's
# pipeline around the call it routes): the served list records them.
ARM: ContextVar[tuple[str, str] | None] = ContextVar("arm", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request's list is logged: by its id, so every process samples alike."""
    return rate >= 1.0 or (rate > 0.0 and int(request_id[:8], 16) < rate * 2**32)


@dataclass(frozen=True)
class ServedList:
    request_id: str
    user_id: int
    item_ids: list[int]
    scores: list[float]
    sources: list[str]
    model_version: str
    rules: list[str]
    context: dict | None
    timestamp: float
    experiment: str | None = None
    arm: str | None = None


class ServedListSink(ABC):
    @abstractmethod
    def write(self, lists: list[ServedList]) -> None:
        """Write a batch; raise if it could not be written."""

    def close(self) -> None:
        """Release what the sink holds."""


class InMemoryServedLog(ServedListSink):
    """The test double: keeps every list written."""

    def __init__(self):
        self.lists: list[ServedList] = []

    def write(self, lists: list[ServedList]) -> None:
        self.lists.extend(lists)


class RedisServedLog(ServedListSink):
    def __init__(self, client, stream: str, max_length: int):
        self.client, self.stream, self.max_length = client, stream, max_length

    def write(self, lists: list[ServedList]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for served in lists:
            pipe.xadd(
                self.stream,
                {
                    "request": served.request_id,
                    "user": str(served.user_id),
                    "items": np.array(served.item_ids, dtype="<u8").tobytes(),
                    "scores": np.array(served.scores, dtype="<f4").tobytes(),
                    "sources": ",".join(served.sources),
                    "model": served.model_version,
                    "rules": ",".join(served.rules),
                    "context": json.dumps(served.context) if served.context else "",
                    "ts": repr(served.timestamp),
                    "experiment": served.experiment or "",
                    "arm": served.arm or "",
                },
                maxlen=self.max_length,
                approximate=True,
            )
        pipe.execute()

    def close(self) -> None:
        self.client.close()


SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("user_id", pa.uint64()),
        ("item_ids", pa.list_(pa.uint64())),
        ("scores", pa.list_(pa.float32())),
        ("sources", pa.list_(pa.string())),
        ("model_version", pa.string()),
        ("rules", pa.list_(pa.string())),
        ("context", pa.string()),
        ("timestamp", pa.float64()),
        ("experiment", pa.string()),
        ("arm", pa.string()),
    ]
)


class ParquetServedLog(ServedListSink):
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files = 0

    def write(self, lists: list[ServedList]) -> None:
        table = pa.Table.from_pylist(
            [
                {
                    "request_id": s.request_id,
                    "user_id": s.user_id,
                    "item_ids": s.item_ids,
                    "scores": s.scores,
                    "sources": s.sources,
                    "model_version": s.model_version,
                    "rules": s.rules,
                    "context": json.dumps(s.context) if s.context else None,
                    "timestamp": s.timestamp,
                    "experiment": s.experiment,
                    "arm": s.arm,
                }
                for s in lists
            ],
            schema=SCHEMA,
        )
        self._files += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        name = f"served-{stamp}-{os.getpid()}-{self._files}.parquet"
        partial = self.folder / f".{name}.partial"  # readers never see half a file
        pq.write_table(table, partial)
        partial.rename(self.folder / name)


def open_served_log(settings: Settings) -> "ServedListLogger | None":
    """The logger `RECSYS_SERVED_LOG` asks for (None: off)."""
    if settings.served_log == "redis":
        config = RedisStoreConfig.from_settings(settings)
        client = connect(replace(config, socket_timeout=5.0, retries=3))
        sink = RedisServedLog(client, settings.served_log_stream, settings.served_log_max_length)
    elif settings.served_log == "parquet":
        sink = ParquetServedLog(settings.served_log_dir)
    else:
        return None
    log.info(
        "served lists logged to %s, %.0f%% sampled",
        settings.served_log,
        100 * settings.served_log_sample,
    )
    return ServedListLogger(sink, settings.served_log_sample)


class ServedListLogger:
    """The bounded queue and the thread that writes it to `sink`."""

    def __init__(
        self,
        sink: ServedListSink,
        sample_rate: float = 1.0,
        queue_size: int = 10_000,
        flush_seconds: float = 1.0,
    ):
        self.sink = sink
        self.sample_rate = sample_rate
        self.flush_seconds = flush_seconds
        self._queue: queue.Queue[ServedList] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="served-log", daemon=True)
        self._thread.start()

    def record(self, served: ServedList | Callable[[], ServedList], request_id: str = "") -> None:
        """Enqueue a served list, or what makes one on the writer's thread (then
        `request_id` says whether it is sampled); never blocks."""
        if not sampled(request_id or served.request_id, self.sample_rate):
            return
        try:
            self._queue.put_nowait(served)
        except queue.Full:
            SERVED_LISTS.labels("dropped").inc()

    def _drain(self) -> list[ServedList]:
        queued = []
        while True:
            try:
                queued.append(self._queue.get_nowait())
            except queue.Empty:
                return [entry if isinstance(entry, ServedList) else entry() for entry in queued]

    def _write(self, lists: list[ServedList]) -> None:
        for start in range(0, len(lists), BATCH):
            batch = lists[start : start + BATCH]
            try:
                self.sink.write(batch)
            except Exception:
                log.exception("served-list log: %d lists not written", len(batch))
                SERVED_LISTS.labels("dropped").inc(len(batch))
            else:
                SERVED_LISTS.labels("written").inc(len(batch))

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            lists = self._drain()
            if lists:
                self._write(lists)

    def close(self) -> None:
        """Write what is queued, then stop (once: pipelines of an experiment share it)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._write(self._drain())
        self.sink.close()
