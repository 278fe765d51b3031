"""Ranking batched across requests (Triton's dynamic batcher, in process): concurrent
requests' candidates scored in one forward pass.

A request that reaches ranking queues its encoded candidates. The first one finding no
forward pass running leads: it waits for the requests still on their way (in flight in
the pipeline, not yet queued: `expecting`) for at most `max_delay` seconds or until the
queue holds `max_rows`, then takes the whole queue, runs one forward pass over it outside
the lock and hands each request its rows; requests that queued meanwhile wait for the
next pass, whose leader is one of them. A request alone in the process never waits: nothing
else is on its way. No thread of its own: the callers' threads take turns to lead.

A forward pass costs a fixed overhead (operator dispatch, allocation) on top of work
proportional to its rows, so one pass over four requests' 200 candidates costs far less
than four passes, and the GIL is held for one dispatch instead of four. The model's rows
are independent in evaluation mode, so a request's scores do not depend on what it was
batched with.
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from service.ranking.encoder import RankingBatch


@dataclass
class _Queued:
    batch: RankingBatch
    scores: np.ndarray | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return len(self.batch.numeric)

    def answer(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        return self.scores


def concatenated(batches: list[RankingBatch]) -> RankingBatch:
    if len(batches) == 1:
        return batches[0]
    return RankingBatch(
        torch.cat([b.categorical for b in batches]),
        torch.cat([b.attributes for b in batches]),
        torch.cat([b.numeric for b in batches]),
    )


class RankBatcher:
    def __init__(
        self,
        forward: Callable[[RankingBatch], np.ndarray],
        max_delay: float,
        max_rows: int = 8192,
    ):
        """`forward`: scores for a batch's rows, in order; `max_delay`: seconds a leader waits
        for requests on their way; `max_rows`: a leader stops waiting once this many are queued."""
        self._forward = forward
        self.max_delay = max_delay
        self.max_rows = max_rows
        self._changed = threading.Condition()
        self._queue: list[_Queued] = []
        self._leading = False
        self._coming = 0  # requests inside `expecting` that have not queued yet
        self._mine = threading.local()  # whether this thread's request is counted in _coming
        self.passes = 0  # forward passes run, and the requests they scored: the batching
        self.requests = 0

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Around a request that may rank: while it is on its way, a leader may wait for it."""
        with self._changed:
            self._coming += 1
        self._mine.coming = True
        try:
            yield
        finally:
            if self._mine.coming:  # it never queued (no ranking, or it failed before)
                self._mine.coming = False
                with self._changed:
                    self._coming -= 1
                    self._changed.notify_all()

    def score(self, batch: RankingBatch) -> np.ndarray:
        """The batch's scores, from a forward pass it may share with other requests."""
        queued = _Queued(batch)
        with self._changed:
            self._queue.append(queued)
            if getattr(self._mine, "coming", False):
                self._mine.coming = False
                self._coming -= 1
            self._changed.notify_all()
            while self._leading and queued.scores is None and queued.error is None:
                self._changed.wait()
            if queued.scores is not None or queued.error is not None:
                return queued.answer()
            self._leading = True
            taken = self._gather()
        try:
            self._run(taken)
        finally:
            with self._changed:
                self._leading = False
                self._changed.notify_all()
        return queued.answer()

    def _gather(self) -> list[_Queued]:
        """The queue, once the requests on their way joined it or `max_delay` passed (the
        lock held; waiting releases it)."""
        deadline = time.monotonic() + self.max_delay
        while self._coming > 0 and sum(q.rows for q in self._queue) < self.max_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.wait(left)
        taken, self._queue = self._queue, []
        return taken

    def _run(self, taken: list[_Queued]) -> None:
        try:
            scores = self._forward(concatenated([q.batch for q in taken]))
        except BaseException as exc:  # every request of the pass gets the error
            for queued in taken:
                queued.error = exc
            return
        start = 0
        for queued in taken:  # slices: np.split costs more than a pass's bookkeeping
            queued.scores = scores[start : start + queued.rows]
            start += queued.rows
        self.passes += 1
        self.requests += len(taken)
