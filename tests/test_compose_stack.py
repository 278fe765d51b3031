"""docker-compose.yml's topology, run as local processes (no Docker engine here).

Every service built from this repository runs its compose `command` with its compose
`environment`, in the order `depends_on` gives, and counts as up when its compose
`healthcheck` command, run locally, passes. Redis runs its compose command too. Only what
Docker itself provides is translated: service hostnames and container ports become loopback
and free ports, named volumes become folders. Prometheus and Grafana are other projects'
images; tests/test_deploy_files.py checks their configuration against these services.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from service.testing.redis_servers import free_port
from tests.test_deploy_files import load_compose, metric_ports, recsys_services
from tests.test_end_to_end import LOAD_REQUESTS, run_locust

BIN = Path(sys.executable).parent
PORT_VARIABLES = ("RECSYS_HTTP_PORT", "RECSYS_GRPC_PORT", "RECSYS_TRAINER_METRICS_PORT")
REDIS_PORT = 6379
HEALTHY_WITHIN_SECONDS = 120


class LocalTopology:
    def __init__(self, compose: dict, root: Path):
        self.compose = compose
        self.services = compose["services"]
        self.recsys = recsys_services(compose)
        self.volumes = {name: root / name for name in compose["volumes"]}
        for folder in self.volumes.values():
            folder.mkdir()
        self.ports = {("redis", REDIS_PORT): free_port()}
        for name, service in self.recsys.items():
            for variable in PORT_VARIABLES:
                if variable in service["environment"]:
                    self.ports[(name, int(service["environment"][variable]))] = free_port()
        self.processes: dict[str, subprocess.Popen] = {}

    def local_port(self, service: str, container_port: int) -> int:
        return self.ports[(service, container_port)]

    def rewrite(self, service: dict, value: str) -> str:
        """A container's view (hostnames, container ports, mount paths) -> this machine's."""
        for (host, port), local in self.ports.items():
            value = value.replace(f"{host}:{port}", f"127.0.0.1:{local}")
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source in self.volumes and (value == target or value.startswith(target + "/")):
                value = str(self.volumes[source]) + value[len(target) :]
        return value

    def environment(self, name: str) -> dict[str, str]:
        service = self.services[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
        env.update({k: self.rewrite(service, v) for k, v in service.get("environment", {}).items()})
        for variable in PORT_VARIABLES:
            if variable in env:
                env[variable] = str(self.local_port(name, int(env[variable])))
        env["RECSYS_HOST"] = "127.0.0.1"
        return env

    def command(self, name: str) -> list[str]:
        service = self.services[name]
        if name == "redis":
            data = self.volumes[service["volumes"][0].split(":")[0]]
            port = self.local_port("redis", REDIS_PORT)
            return [
                *service["command"],
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
            ]
        return [str(BIN / "recsys"), *(self.rewrite(service, arg) for arg in service["command"])]

    def healthcheck(self, name: str) -> list[str]:
        test = self.services[name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        if name == "redis":
            return [test[1], "-p", str(self.local_port("redis", REDIS_PORT)), *test[2:]]
        return [sys.executable if arg == "python" else arg for arg in test[1:]]

    def start(self, name: str) -> None:
        self.processes[name] = subprocess.Popen(
            self.command(name),
            env=self.environment(name),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_done(self, name: str) -> None:
        output = self.processes[name].communicate(timeout=HEALTHY_WITHIN_SECONDS)[0]
        assert self.processes[name].returncode == 0, f"{name}: {output}"

    def wait_healthy(self, name: str) -> None:
        deadline = time.monotonic() + HEALTHY_WITHIN_SECONDS
        while time.monotonic() < deadline:
            process = self.processes[name]
            if process.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {process.returncode}: {process.stdout.read()}"
                )
            if (
                subprocess.run(
                    self.healthcheck(name), env=self.environment(name), capture_output=True
                ).returncode
                == 0
            ):
                return
            time.sleep(0.5)
        raise AssertionError(f"{name}: healthcheck still failing after {HEALTHY_WITHIN_SECONDS}s")

    def runnable(self) -> list[str]:
        return ["redis", *self.recsys]

    def start_in_dependency_order(self) -> list[list[str]]:
        """Start each wave of services whose dependencies hold, as compose would."""
        pending, done, waves = list(self.runnable()), set(), []
        while pending:
            wave = [n for n in pending if set(self.services[n].get("depends_on", {})) <= done]
            assert wave, f"depends_on cycle or a dependency that cannot run here: {pending}"
            for name in wave:
                self.start(name)
            for name in wave:
                condition = {
                    r["condition"]
                    for s in self.services.values()
                    for d, r in s.get("depends_on", {}).items()
                    if d == name
                }
                if condition == {"service_completed_successfully"}:
                    self.wait_done(name)
                else:
                    self.wait_healthy(name)
            done.update(wave)
            pending = [n for n in pending if n not in done]
            waves.append(wave)
        return waves

    def stop(self, name: str, signum=signal.SIGTERM) -> tuple[int, str]:
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(signum)
        output = process.communicate(timeout=30)[0]
        return process.returncode, output


@pytest.fixture(scope="module")
def topology(tmp_path_factory, artifact_root):
    compose = load_compose()
    local = LocalTopology(compose, tmp_path_factory.mktemp("compose"))
    # The demo job trains with `--if-missing`: seeding its volume with the suite's small artifact
    # keeps this test to seconds (training itself is tested elsewhere); the job still runs.
    shutil.copytree(artifact_root, local.volumes["artifacts"], dirs_exist_ok=True)
    try:
        waves = local.start_in_dependency_order()
        yield local, waves
    finally:
        for name in local.processes:
            local.stop(name, signal.SIGKILL)


def test_compose_services_start_in_dependency_order_and_pass_their_healthchecks(topology):
    local, waves = topology
    assert [set(wave) for wave in waves] == [
        {"redis", "demo-artifacts"},
        {"retrieval", "ranking", "online-trainer"},
        {"gateway"},
    ]
    not_run = set(local.services) - set(local.runnable())
    assert not_run == {"prometheus", "grafana"}  # other projects' images


def test_the_gateway_answers_through_the_compose_topology(
    topology, known_user, bundle, served_variant
):
    local, _ = topology
    gateway = local.environment("gateway")
    with httpx2.Client(
        base_url=f"http://127.0.0.1:{gateway['RECSYS_HTTP_PORT']}", timeout=10
    ) as http:
        answer = http.post("/v1/recommend", json={"user_id": known_user, "k": 5}).json()
        assert answer["degraded"] is False and answer["model_version"] == bundle.version
        # Ranked by the ranking tier, not its fallback.
        assert answer["ranker"]["variant"] == served_variant
        shown = [item["item_id"] for item in answer["items"]]
        events = [{"user_id": known_user, "item_id": shown[0], "type": "click"}]
        assert http.post("/v1/events", json={"events": events}).json()["accepted"] == 1


def test_every_scraped_tier_serves_metrics(topology):
    local, _ = topology
    for name, service in local.recsys.items():
        if service["command"][0] != "serve":
            continue
        (port,) = metric_ports(local.environment(name), service["command"])
        metrics = httpx2.get(f"http://127.0.0.1:{port}/metrics").text
        assert "recsys_" in metrics, name


def test_redis_keeps_an_append_only_file_in_its_volume(topology):
    local, _ = topology
    assert any(local.volumes["redis-data"].glob("appendonlydir/*.aof"))


def locust_against(
    local: LocalTopology, tmp_path: Path, **settings: str
) -> tuple[subprocess.CompletedProcess, dict]:
    gateway = local.environment("gateway")
    return run_locust(
        f"http://127.0.0.1:{gateway['RECSYS_HTTP_PORT']}",
        f"127.0.0.1:{gateway['RECSYS_GRPC_PORT']}",
        gateway["RECSYS_ARTIFACTS"],
        tmp_path,
        **settings,
    )


def test_a_short_load_run_over_http_and_grpc_has_no_failures(topology, tmp_path):
    local, _ = topology
    result, rows = locust_against(local, tmp_path, p95_ms="10000", p99_ms="10000")
    assert result.returncode == 0, result.stderr[-3000:]
    for key in LOAD_REQUESTS:
        assert int(rows[key]["Request Count"]) > 0 and int(rows[key]["Failure Count"]) == 0, (
            key,
            rows.get(key),
        )
    assert "SLO kept" in result.stderr


def test_the_slo_gate_fails_a_run_that_breaks_its_latency_budget(topology, tmp_path):
    local, _ = topology
    result, rows = locust_against(local, tmp_path, p99_ms="0.001")
    assert result.returncode == 1 and "SLO broken: p99" in result.stderr, result.stderr[-3000:]
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0  # the requests themselves succeeded


def test_tiers_drain_and_exit_cleanly_on_sigterm(topology):
    local, _ = topology
    for name in ("gateway", "online-trainer", "ranking", "retrieval"):
        code, output = local.stop(name)
        # uvicorn re-raises SIGTERM after its own clean shutdown, so the gateway ends by the signal.
        assert code in ((0, -signal.SIGTERM) if name == "gateway" else (0,)), (
            f"{name}: {code}\n{output}"
        )
