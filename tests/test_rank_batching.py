"""Ranking batched across requests (`service.ranking.batching`): concurrent requests share
forward passes and get the scores they would get alone."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.embedded import build_app
from service.pipeline.in_process import RankingStage
from service.ranking.batching import RankBatcher
from service.schemas import Context
from service.settings import Settings

REQUESTS = 6


def requests_of(bundle, n: int = REQUESTS) -> list[tuple]:
    rng = np.random.default_rng(3)
    return [
        (
            int(user),
            rng.choice(bundle.features.items.ids, 120, replace=False),
            rng.random(120).astype(np.float32),
            Context(hour=int(rng.integers(24)), weekday=int(rng.integers(7))),
        )
        for user in bundle.features.users.ids[:n]
    ]


def test_requests_on_their_way_share_one_forward_pass_and_get_their_own_scores(bundle):
    alone = RankingStage(bundle.ranking_parts)
    batched = RankingStage(bundle.ranking_parts, batch_delay=30.0)
    asked = requests_of(bundle)
    expected = [alone.rank(*request) for request in asked]
    all_on_their_way = threading.Barrier(len(asked))

    def rank(request: tuple) -> np.ndarray:
        with batched.expecting():
            all_on_their_way.wait()
            return batched.rank(*request)

    with ThreadPoolExecutor(len(asked)) as pool:
        answers = list(pool.map(rank, asked))
    # The leader waited for every request in flight, so one pass scored them all.
    assert (batched.batcher.passes, batched.batcher.requests) == (1, len(asked))
    for got, want in zip(answers, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not np.allclose(answers[0][:10], answers[1][:10])  # each got its own rows


def test_a_request_alone_never_waits_for_the_delay(bundle):
    stage = RankingStage(bundle.ranking_parts, batch_delay=30.0)
    request = requests_of(bundle, 1)[0]
    started = time.monotonic()
    with stage.expecting():
        stage.rank(*request)
    assert time.monotonic() - started < 10  # far below the 30 s a wrong count would cost
    assert stage.batcher.passes == 1


def test_a_request_that_leaves_without_ranking_stops_the_wait_for_it(bundle):
    stage = RankingStage(bundle.ranking_parts, batch_delay=30.0)
    request = requests_of(bundle, 1)[0]
    leaves, answered = threading.Event(), []

    def never_ranks() -> None:
        with stage.expecting():
            leaves.wait(10)

    other = threading.Thread(target=never_ranks)
    other.start()
    time.sleep(0.05)  # the other request is on its way: a leader would wait for it

    def ranks() -> None:
        with stage.expecting():
            answered.append(stage.rank(*request))

    waiting = threading.Thread(target=ranks)
    waiting.start()
    time.sleep(0.2)
    assert not answered  # the leader still waits for the other request
    leaves.set()
    waiting.join(10)
    other.join(10)
    assert len(answered) == 1 and len(answered[0]) == len(request[1])


def test_a_failing_pass_fails_each_request_in_it_and_the_next_pass_runs():
    calls = []

    def forward(batch):
        calls.append(len(batch.numeric))
        if len(calls) == 1:
            raise RuntimeError("forward failed")
        return np.arange(len(batch.numeric), dtype=np.float32)

    class Rows:
        def __init__(self, n):
            self.numeric = np.zeros(n)

    batcher = RankBatcher(forward, max_delay=0.001)
    with pytest.raises(RuntimeError, match="forward failed"):
        batcher.score(Rows(3))
    np.testing.assert_array_equal(batcher.score(Rows(2)), [0, 1])


def test_concurrent_http_answers_with_batching_equal_those_without(artifact_root, bundle):
    users = [int(u) for u in bundle.features.users.ids[:24]]

    def answers(delay_ms: float) -> dict[int, list]:
        settings = Settings(
            artifacts=artifact_root, grpc_port=0, ranker="on", rank_batch_delay_ms=delay_ms
        )
        with TestClient(build_app(settings)) as client:

            def ask(user: int) -> list:
                body = {"user_id": user, "k": 10, "context": {"hour": 8, "weekday": 1}}
                response = client.post("/v1/recommend", json=body)
                assert response.status_code == 200, response.text
                return [(i["item_id"], i["score"]) for i in response.json()["items"]]

            with ThreadPoolExecutor(8) as pool:
                found = dict(zip(users, pool.map(ask, users)))
            batcher = client.app.state.pipeline.ranking.batcher
            return found, batcher

    unbatched, none = answers(0)
    batched, batcher = answers(50)
    assert none is None and batcher.requests == len(users)
    for user in users:
        want, got = unbatched[user], batched[user]
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=1e-6)
