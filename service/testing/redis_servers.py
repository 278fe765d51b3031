"""Start real `redis-server` processes on free loopback ports: a standalone server (plain,
with a password, or TLS only) or a Redis Cluster of several masters. Used by the tests and
benchmarks; each server lives in a temporary folder and is stopped by `stop()`."""

import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_GIVEN: set[int] = set()  # ports this process handed out: never twice


def _ephemeral_ports_start() -> int:
    """Where the kernel's range for outgoing connections' local ports begins."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(cluster_bus: bool = False) -> int:
    """A free loopback port; for Cluster, port + 10000 (its bus) is free too.

    Drawn below the kernel's ephemeral range: a port the kernel hands out for `bind(0)`
    may be given to another process's outgoing connection before the server that asked
    for it binds it (a test stack starts many processes that connect to each other)."""
    top = min(_ephemeral_ports_start(), 65536) - 10_000  # the bus stays below the range too
    for _ in range(200):
        port = random.randrange(10_000, max(top, 10_001))
        if port in _GIVEN or (cluster_bus and port + 10_000 in _GIVEN):
            continue  # handed out already, perhaps not bound yet
        if _port_is_free(port) and (not cluster_bus or _port_is_free(port + 10_000)):
            _GIVEN.update((port, port + 10_000) if cluster_bus else (port,))
            return port
    raise RuntimeError("no free port pair found")


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server is not installed: scripts/test.sh installs it (apt-get install redis-server)"
        )
    return path


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 that it signed."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, folder: Path) -> "TlsFiles":
        openssl = shutil.which("openssl") or "openssl"
        folder.mkdir(parents=True, exist_ok=True)
        files = cls(folder / "ca.crt", folder / "redis.crt", folder / "redis.key")
        (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        for command in (
            [
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=recsys test CA",
            ],
            [
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "redis.key",
                "-out",
                "redis.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
            [
                "x509",
                "-req",
                "-in",
                "redis.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "redis.crt",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        ):
            subprocess.run(
                [openssl, *command], cwd=folder, check=True, capture_output=True, timeout=60
            )
        return files


class RedisServer:
    def __init__(
        self,
        *extra_args: str,
        port: int | None = None,
        cluster: bool = False,
        password: str | None = None,
        tls: TlsFiles | None = None,
        parent: Path | None = None,
    ):
        """`tls`: serve TLS only, on `port` (the plain port is off); `parent`: where its data
        folder goes (default: the system's temporary folder)."""
        self.port = port or free_port(cluster_bus=cluster)
        self.password = password
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="recsys-redis-", dir=parent))
        listen = (
            ["--port", str(self.port)]
            if tls is None
            else [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(tls.cert),
                "--tls-key-file",
                str(tls.key),
                "--tls-ca-cert-file",
                str(tls.ca),
                "--tls-auth-clients",
                "no",
            ]
        )
        self.args = [
            require_redis_server(),
            *listen,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            *(
                ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                if cluster
                else []
            ),
            *(["--requirepass", password] if password else []),
            *extra_args,
        ]
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:  # verify the server against the test CA
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServers:
    """A cluster of `masters` masters, no replicas, all slots assigned."""

    def __init__(self, masters: int = 3):
        self.nodes = [RedisServer(cluster=True) for _ in range(masters)]
        subprocess.run(
            [
                shutil.which("redis-cli") or "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for node in self.nodes:
            client = redis.Redis(port=node.port, socket_timeout=1)
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("redis cluster did not reach cluster_state:ok")
                time.sleep(0.1)
            client.close()

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
