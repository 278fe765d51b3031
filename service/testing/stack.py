"""The distributed topology as local processes on loopback, for fault tests and benchmarks:
Redis, retrieval and ranking replicas, the online trainer and the gateway, each a real
`recsys serve ...` process. Every tier replica sits behind a `FaultProxy`, so a test can
slow a tier down, and a replica slot can be filled, emptied or refilled while the gateway
keeps its target list (two slots per tier, as a headless Service with two pods)."""

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.testing.redis_servers import RedisServer, free_port

RECSYS = Path(sys.executable).with_name("recsys")
REPLICA_SLOTS = 2
TIERS = ("retrieval", "ranking")


class FaultProxy:
    """A TCP proxy in front of one replica: forwards both ways, holds answers back by
    `delay` seconds (latency only: every chunk is sent `delay` after it arrived, none waits
    behind another), and refuses connections while it has no upstream."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream: int | None = None
        self.delay = 0.0
        self._closed = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()

    def point_at(self, upstream: int | None) -> None:
        """Send new connections to `upstream`; None: refuse them. Open connections are cut."""
        self.upstream = upstream
        with self._lock:
            for connection in self._connections:
                connection.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = self.upstream
            try:
                server = (
                    socket.create_connection(("127.0.0.1", upstream), timeout=1)
                    if upstream
                    else None
                )
            except OSError:
                server = None
            if server is None:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._connections |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, delayed: bool) -> None:
        chunks: queue.Queue = queue.Queue()
        sender = threading.Thread(target=self._send, args=(chunks, target), daemon=True)
        sender.start()
        try:
            while data := source.recv(65536):
                chunks.put((time.monotonic() + (self.delay if delayed else 0.0), data))
        except OSError:
            pass
        chunks.put(None)
        sender.join()
        for end in (source, target):
            end.close()
            with self._lock:
                self._connections.discard(end)

    @staticmethod
    def _send(chunks: queue.Queue, target: socket.socket) -> None:
        while (chunk := chunks.get()) is not None:
            due, data = chunk
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            try:
                target.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        self.point_at(None)


@dataclass
class Replica:
    tier: str
    http_port: int
    grpc_port: int
    process: subprocess.Popen
    log: Path


def wait_serving(address: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until gRPC health says SERVING; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{address}: process exited with {process.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} not serving after {timeout}s")


class LocalStack:
    """Start with `start()`; `close()` kills whatever is left. `redis` is started with the
    arguments given (the fault scenarios use AOF with `appendfsync always`)."""

    def __init__(
        self,
        artifacts: Path,
        *redis_args: str,
        admin_token: str | None = None,
        env: dict | None = None,
        redis_parent: Path | None = None,
    ):
        self.artifacts = Path(artifacts)
        self.folder = Path(tempfile.mkdtemp(prefix="recsys-stack-"))
        self.redis = RedisServer(*redis_args, parent=redis_parent)
        self.namespace = uuid.uuid4().hex[:8]
        self.events_stream = f"events-{self.namespace}"
        self.event_group = f"trainer.{self.namespace}"
        self.admin_token = admin_token
        self.env = dict(
            os.environ,
            RECSYS_ARTIFACTS=str(self.artifacts),
            RECSYS_REDIS_URL=self.redis.url,
            RECSYS_REDIS_NAMESPACE=self.namespace,
            RECSYS_EVENTS_STREAM=self.events_stream,
            RECSYS_HOST="127.0.0.1",
            RECSYS_TRAINER_CONSUMER="trainer-0",
            RECSYS_INDEX_POLL_SECONDS="0",
            **(env or {}),
        )
        if admin_token:
            self.env["RECSYS_ADMIN_TOKEN"] = admin_token
        self.proxies = {tier: [FaultProxy() for _ in range(REPLICA_SLOTS)] for tier in TIERS}
        self.replicas: dict[tuple[str, int], Replica] = {}
        self.trainer: Replica | None = None
        self.gateway: Replica | None = None
        self._started = 0

    def _spawn(self, tier: str, **extra: str) -> Replica:
        self._started += 1
        http_port, grpc_port = free_port(), free_port()
        log = self.folder / f"{self._started:02d}-{tier}.log"
        env = {
            **self.env,
            "RECSYS_HTTP_PORT": str(http_port),
            "RECSYS_GRPC_PORT": str(grpc_port),
            **extra,
        }
        with log.open(
            "w"
        ) as handle:  # a file, not a pipe: a chatty process never blocks on its output
            process = subprocess.Popen(
                [str(RECSYS), "serve", tier], env=env, stdout=handle, stderr=subprocess.STDOUT
            )
        return Replica(tier, http_port, grpc_port, process, log)

    def start(self) -> None:
        """Both tiers (slot 0), the trainer, then the gateway, each once it can serve."""
        for tier in TIERS:
            self.start_replica(tier, 0)
        self.start_trainer()
        self.gateway = self._spawn(
            "gateway", **{f"RECSYS_{tier.upper()}_ADDRESS": self.target(tier) for tier in TIERS}
        )
        wait_ready(f"{self.gateway_url}/readyz", self.gateway)

    def target(self, tier: str) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{proxy.port}" for proxy in self.proxies[tier])

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    def start_replica(self, tier: str, slot: int, artifacts: Path | None = None) -> Replica:
        """Start a replica of `tier` into `slot` and route the slot's proxy to it once it serves."""
        extra = {"RECSYS_ARTIFACTS": str(artifacts)} if artifacts is not None else {}
        replica = self._spawn(tier, **extra)
        wait_serving(f"127.0.0.1:{replica.grpc_port}", replica.process)
        self.replicas[(tier, slot)] = replica
        self.proxies[tier][slot].point_at(replica.grpc_port)
        return replica

    def stop_replica(self, tier: str, slot: int, signum: int = signal.SIGTERM) -> int:
        """Signal the replica in `slot`; its exit status once it is gone (its slot then refuses)."""
        replica = self.replicas.pop((tier, slot))
        replica.process.send_signal(signum)
        code = replica.process.wait(timeout=60)
        self.proxies[tier][slot].point_at(None)
        return code

    def start_trainer(self) -> Replica:
        self.trainer = self._spawn("online-train", RECSYS_TRAINER_METRICS_PORT="0")
        wait_serving(
            f"127.0.0.1:{self.trainer.grpc_port}", self.trainer.process
        )  # in its event group
        return self.trainer

    def kill_trainer(self) -> None:
        self.trainer.process.kill()
        self.trainer.process.wait(timeout=30)

    def restart_redis(self, down_seconds: float) -> float:
        """Kill Redis (SIGKILL, as a crash), keep it away `down_seconds`, start it again on the
        same port and data folder; returns when it answers again (time.monotonic())."""
        self.redis.kill()
        time.sleep(down_seconds)
        self.redis.start()
        return time.monotonic()

    def close(self) -> None:
        processes = [
            r.process
            for r in (*self.replicas.values(), self.trainer, self.gateway)
            if r is not None
        ]
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.close()
        self.redis.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def wait_ready(url: str, replica: Replica, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            raise RuntimeError(
                f"{replica.tier} exited with {replica.process.returncode}: {replica.log.read_text()[-2000:]}"
            )
        try:
            if httpx2.get(url, timeout=1).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")
