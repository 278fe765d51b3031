"""The circuit breaker guarding Redis and the tiers: state changes, and calls that really run at once."""

import threading

import pytest

from service.breaker import CLOSED, HALF_OPEN, OPEN, BreakerOpen, CircuitBreaker


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Down(Exception):
    pass


def fail():
    raise Down("service down")


def test_failures_in_a_row_open_it_and_an_open_breaker_does_not_call():
    clock, changes = Clock(), []
    breaker = CircuitBreaker(
        "tier", failures=3, reset_seconds=2.0, on_change=changes.append, counts=(Down,), clock=clock
    )
    for _ in range(2):
        with pytest.raises(Down):
            breaker.call(fail)
    assert breaker.call(lambda: "fine") == "fine"  # a success resets the count
    for _ in range(3):
        with pytest.raises(Down):
            breaker.call(fail)
    assert breaker.state == OPEN and changes == [OPEN]
    calls = []
    clock.now = 1.9
    with pytest.raises(BreakerOpen, match="tier: breaker open"):
        breaker.call(calls.append, 1)
    assert calls == []


def test_after_the_reset_time_one_trial_call_decides():
    clock, changes = Clock(), []
    breaker = CircuitBreaker(
        "redis",
        failures=1,
        reset_seconds=2.0,
        on_change=changes.append,
        counts=(Down,),
        clock=clock,
    )
    with pytest.raises(Down):
        breaker.call(fail)
    clock.now = 2.0
    with pytest.raises(Down):
        breaker.call(fail)  # the trial fails: open again, for another reset time
    assert changes == [OPEN, HALF_OPEN, OPEN]
    clock.now = 3.9
    with pytest.raises(BreakerOpen):
        breaker.call(lambda: None)

    clock.now = 4.0
    during_trial = []

    def trial():
        with pytest.raises(BreakerOpen):  # while the trial runs, other calls fail at once
            breaker.call(lambda: during_trial.append("ran"))
        return "ok"

    assert breaker.call(trial) == "ok"
    assert during_trial == [] and breaker.state == CLOSED and changes[-2:] == [HALF_OPEN, CLOSED]


def test_errors_it_does_not_count_pass_through_without_opening_it():
    breaker = CircuitBreaker("tier", failures=1, counts=(Down,))
    with pytest.raises(ValueError):
        breaker.call(int, "not a number")
    assert breaker.state == CLOSED


def test_concurrent_calls_run_concurrently():
    breaker = CircuitBreaker("redis")
    both_inside = threading.Barrier(
        2, timeout=5
    )  # breaks (and the calls raise) unless both are in at once
    results = []

    def call():
        results.append(breaker.call(both_inside.wait))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 1]
