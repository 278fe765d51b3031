"""`recsys serve --workers N` (`service.api.workers`): forked workers on shared ports, each
answering, counted together in /metrics, drained together on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx2
import pytest
from prometheus_client.mmap_dict import MmapedDict
from pydantic import ValidationError
from typer.testing import CliRunner

from service.cli import app
from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.settings import Settings
from service.testing.redis_servers import free_port

BIN = Path(sys.executable).parent
WORKERS = 2
REQUESTS = 40


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def recommend_counts(metrics_dir: Path) -> dict[int, float]:
    """/v1/recommend requests each process counted, from its multiprocess file."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        total = 0.0
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, labels, _ = json.loads(key)  # metric, sample, labels, help
            if sample == "recsys_requests_total" and labels.get("endpoint") == "/v1/recommend":
                total += value
        counts[int(path.stem.split("_")[1])] = total
    return counts


@pytest.fixture
def workers(tmp_path, artifact_root, redis_server):
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update(
        RECSYS_ARTIFACTS=str(artifact_root),
        RECSYS_REDIS_URL=redis_server.url,
        RECSYS_REDIS_NAMESPACE=f"workers{http_port}",
        RECSYS_HOST="127.0.0.1",
        RECSYS_HTTP_PORT=str(http_port),
        RECSYS_GRPC_PORT=str(grpc_port),
        RECSYS_INDEX_POLL_SECONDS="0",
        RECSYS_LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )
    supervisor = subprocess.Popen(
        [str(BIN / "recsys"), "serve", "all", "--workers", str(WORKERS)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert supervisor.poll() is None, supervisor.stderr.read().decode()[-3000:]
        try:
            ready = httpx2.get(f"{url}/metrics", timeout=2).text
            if f"recsys_ready {float(WORKERS)}" in ready:
                break
        except httpx2.TransportError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("the workers did not get ready")
    yield supervisor, url, grpc_port, tmp_path
    pids = children(supervisor.pid) if supervisor.poll() is None else []
    if supervisor.poll() is None:
        supervisor.kill()  # outright: its workers must stop with it
        supervisor.wait(30)
    supervisor.stderr.close()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids), "workers outlived their supervisor"


def test_every_worker_answers_on_the_shared_ports_and_metrics_count_them_all(workers, known_user):
    supervisor, url, grpc_port, metrics_dir = workers
    pids = children(supervisor.pid)
    assert len(pids) == WORKERS
    body = {"user_id": known_user, "k": 5}
    answers = []
    for _ in range(REQUESTS):  # a new connection each: the kernel picks a worker for each
        response = httpx2.post(f"{url}/v1/recommend", json=body, timeout=10)
        assert response.status_code == 200, response.text
        answers.append([i["item_id"] for i in response.json()["items"]])
    assert all(a == answers[0] for a in answers)  # the workers answer alike
    counts = recommend_counts(metrics_dir)
    assert all(counts.get(pid, 0) > 0 for pid in pids), counts  # each one served some
    assert sum(counts.values()) == REQUESTS
    # Any worker's /metrics answers for all of them.
    metrics = httpx2.get(f"{url}/metrics", timeout=5).text
    line = 'recsys_requests_total{code="200",endpoint="/v1/recommend",transport="http"}'
    assert f"{line} {float(REQUESTS)}" in metrics
    assert "recsys_model_info{" in metrics
    for _ in range(4):  # gRPC on the shared port too
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = pb_grpc.RecommenderStub(channel).Recommend(
                pb.RecommendRequest(user_id=known_user, k=5), timeout=10
            )
        assert [i.item_id for i in reply.items] == answers[0]


def test_sigterm_drains_every_worker_and_the_supervisor_exits_cleanly(workers, known_user):
    supervisor, url, _, _ = workers
    pids = children(supervisor.pid)
    codes: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx2.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    codes.append(
                        http.post(f"{url}/v1/recommend", json={"user_id": known_user}).status_code
                    )
                except httpx2.TransportError:  # the ports close once draining ends
                    return

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(1.0)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0, supervisor.stderr.read().decode()[-3000:]
    stop.set()
    for thread in clients:
        thread.join(15)
    assert codes and set(codes) <= {200, 503}  # answered or told to go elsewhere, never a 500
    assert codes.count(200) > 0
    assert not any(alive(pid) for pid in pids)


def test_more_than_one_worker_needs_redis_and_an_http_process(artifact_root):
    with pytest.raises(ValidationError, match="RECSYS_WORKERS > 1 needs RECSYS_REDIS_URL"):
        Settings(artifacts=artifact_root, workers=2)
    refused = CliRunner().invoke(
        app,
        ["serve", "ranking", "--workers", "2", "--artifacts", str(artifact_root)],
        env={"RECSYS_REDIS_URL": "redis://127.0.0.1:1"},
    )
    assert refused.exit_code != 0 and "scale a tier with replicas" in refused.output
