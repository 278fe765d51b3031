"""`recsys serve` as a real process on loopback, driven over HTTP, gRPC and by locust."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from service.proto_gen.recsys.v1 import recommender_pb2 as pb
from service.proto_gen.recsys.v1 import recommender_pb2_grpc as pb_grpc
from service.testing.redis_servers import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"server exited with {process.returncode}: {process.stdout.read()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout}s")


@pytest.fixture(scope="module")
def server(artifact_root):
    http_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            str(BIN / "recsys"),
            "serve",
            "--artifacts",
            str(artifact_root),
            "--host",
            "127.0.0.1",
            "--port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{http_port}/readyz", process)
        yield http_port, grpc_port, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        process.stdout.close()


def test_served_process_answers_http_and_grpc(server, known_user):
    http_port, grpc_port, _ = server
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/recommend",
        data=json.dumps({"user_id": known_user, "k": 5}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        over_http = json.loads(response.read())
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        over_grpc = pb_grpc.RecommenderStub(channel).Recommend(
            pb.RecommendRequest(user_id=known_user, k=5), timeout=10
        )
    assert [i["item_id"] for i in over_http["items"]] == [i.item_id for i in over_grpc.items]
    assert len(over_http["items"]) == 5


LOAD_REQUESTS = (
    ("POST", "/v1/recommend"),
    ("POST", "/v1/events"),
    ("grpc", "Recommend"),
    ("grpc", "SendEvents"),
)


def run_locust(
    http_url: str, grpc_target: str, artifacts: str, tmp_path, **settings: str
) -> tuple[subprocess.CompletedProcess, dict]:
    """A short headless run of load_tests/locustfile.py (HTTP and gRPC users); its CSV rows by (type, name)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update(RECSYS_ARTIFACTS=artifacts, RECSYS_LOAD_GRPC_TARGET=grpc_target)
    env.update({f"RECSYS_LOAD_{k.upper()}": v for k, v in settings.items()})
    result = subprocess.run(
        [
            str(BIN / "locust"),
            "-f",
            str(ROOT / "load_tests/locustfile.py"),
            "--headless",
            "-u",
            "6",
            "-r",
            "6",
            "-t",
            "4s",
            "--host",
            http_url,
            "--csv",
            str(tmp_path / "load"),
            "--only-summary",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    with open(tmp_path / "load_stats.csv", newline="") as stats:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}
    return result, rows


def test_locust_headless_run_has_no_failures(server, artifact_root, tmp_path):
    http_port, grpc_port, _ = server
    result, rows = run_locust(
        f"http://127.0.0.1:{http_port}",
        f"127.0.0.1:{grpc_port}",
        str(artifact_root),
        tmp_path,
        p95_ms="10000",
        p99_ms="10000",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for key in LOAD_REQUESTS:
        assert int(rows[key]["Request Count"]) > 0 and int(rows[key]["Failure Count"]) == 0, (
            key,
            rows.get(key),
        )


def test_sigterm_stops_the_server_cleanly(artifact_root):
    http_port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "recsys"),
            "serve",
            "--artifacts",
            str(artifact_root),
            "--host",
            "127.0.0.1",
            "--port",
            str(http_port),
            "--grpc-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_ready(f"http://127.0.0.1:{http_port}/readyz", process)
    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status shows it
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    output = process.stdout.read()
    process.stdout.close()
    assert "Application shutdown complete" in output


def test_serve_refuses_a_missing_artifact_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [
            str(BIN / "recsys"),
            "serve",
            "--artifacts",
            str(tmp_path / "none"),
            "--port",
            str(free_port()),
            "--grpc-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "does not exist" in result.stdout + result.stderr
