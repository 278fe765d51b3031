"""A circuit breaker that lets concurrent calls run concurrently.

pybreaker holds one lock for the whole of every call it guards (danielfm/pybreaker#3, #55),
so the calls of every thread sharing a breaker run one at a time: with one breaker per
Redis client and per tier, a process served one Redis lookup and one tier call at a time.
Here the lock guards only the state: closed (calls run; `failures` failures in a row open
it), open (calls fail at once with `BreakerOpen` for `reset_seconds`), then half-open
(one trial call runs, the others fail at once; its success closes the breaker, its failure
opens it again).
"""

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class BreakerOpen(Exception):
    """The breaker is open: the call was not made."""


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failures: int = 5,
        reset_seconds: float = 2.0,
        on_change: Callable[[str], None] | None = None,
        counts: tuple[type[BaseException], ...] = (Exception,),
        clock: Callable[[], float] = time.monotonic,
    ):
        """`counts`: the exceptions that count as a failure of the guarded service; others
        (a caller's bad input, say) pass through without moving the breaker."""
        self.name = name
        self.failures = failures
        self.reset_seconds = reset_seconds
        self.on_change = on_change
        self.counts = counts
        self.clock = clock
        self.state = CLOSED
        self._failed = 0
        self._opened_at = 0.0
        self._lock = threading.Lock()

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(state)

    def _admit(self) -> bool:
        """Whether a call may run now; the first after `reset_seconds` open is the trial."""
        with self._lock:
            if self.state == CLOSED:
                return False
            if self.state == OPEN and self.clock() - self._opened_at >= self.reset_seconds:
                self._set(HALF_OPEN)
                return True
            raise BreakerOpen(f"{self.name}: breaker open")

    def call(self, func: Callable[..., T], *args, **kwargs) -> T:
        trial = self._admit()
        try:
            result = func(*args, **kwargs)
        except self.counts:
            with self._lock:
                self._failed += 1
                if trial or self._failed >= self.failures:
                    self._opened_at = self.clock()
                    self._set(OPEN)
            raise
        except BaseException:
            if trial:  # not the service's failure, yet the trial is over: let the next call try
                with self._lock:
                    self._set(OPEN)
            raise
        with self._lock:
            self._failed = 0
            self._set(CLOSED)
        return result
