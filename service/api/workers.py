"""`recsys serve all|gateway --workers N`: N serving processes on one box, one set of ports.

The supervisor loads the artifact once (the embedded service; a gateway has none) and forks
the workers from it: the artifact's arrays, the models and the imported libraries stay in
pages the workers share until one of them writes there (copy on write; `gc.freeze` keeps
the collector from writing into the objects loaded so far), so a worker adds its own
request-time memory, not another copy of the artifact. Each worker binds the HTTP and gRPC
ports with SO_REUSEPORT, so the kernel spreads connections over them, and runs its own event
loop, gRPC server, interpreter lock and online-learning threads (index sync, catalog
follower): throughput grows with cores. They share what has to be one through Redis: the
embedding table, the event log, the catalog and update feeds (hence RECSYS_REDIS_URL); only
the first runs the in-process online trainer. Every worker's /metrics answers for all of
them (PROMETHEUS_MULTIPROC_DIR, `service.metrics.exposition`).

SIGTERM or SIGINT to the supervisor goes to every worker as SIGTERM; each drains as a single
process does, and the supervisor exits once they all have (0 when every one exited 0); a
supervisor killed outright takes its workers with it (SIGTERM on the parent's death). A
worker that dies while serving is replaced by a new fork of the supervisor; one that dies
within `STARTUP_SECONDS` of its start stops them all (a port in use, an artifact that does
not load: another fork would fail alike).
"""

import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from fastapi import FastAPI

from service.settings import Settings

log = logging.getLogger(__name__)

STARTUP_SECONDS = 10.0
RESTART_DELAY_SECONDS = 1.0
LISTEN_BACKLOG = 2048  # uvicorn's default
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes may bind too (the kernel balances
    connections across them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    return sock


def stop_with_parent() -> None:
    """SIGTERM to this process when its parent dies (Linux's PR_SET_PDEATHSIG): a
    supervisor killed outright (SIGKILL, out of memory) leaves no worker serving alone."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


def serve_http(app: FastAPI, settings: Settings) -> int:
    """One worker's HTTP server until it is told to stop; its exit code."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=settings.log_level.lower()))
    server.run(sockets=[reuse_port_socket(settings.host, settings.http_port)])
    return 0 if server.started else 3  # uvicorn's code for a failed startup


class Supervisor:
    def __init__(self, workers: int, run: Callable[[int], int]):
        """`run(index)`: a worker's whole life in the forked process; its exit code."""
        self.workers = workers
        self.run = run
        self.pids: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
        self.stopping = False

    def _fork(self, index: int) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid:
            self.pids[pid] = (index, time.monotonic())
            return
        code = 1
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):  # the worker's server sets its own
                signal.signal(signum, signal.SIG_DFL)
            stop_with_parent()
            if os.getppid() != supervisor:  # it died before the line above took effect
                os._exit(1)
            code = self.run(index)
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(code)

    def _stop(self, signum: int, _frame) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self.pids))
        self.stopping = True
        for pid in self.pids:
            os.kill(pid, signal.SIGTERM)

    def serve(self) -> int:
        """Fork the workers, replace those that die while serving; the exit code once all
        have stopped: the worst of theirs."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        for index in range(self.workers):
            self._fork(index)
        log.info("%d workers serving (pids %s)", self.workers, sorted(self.pids))
        worst = 0
        while self.pids:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index, started = self.pids.pop(pid)
            self._forget(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping and code == -signal.SIGTERM:
                code = 0  # uvicorn re-raises the signal it drained on: a clean stop
            worst = max(worst, abs(code))
            if self.stopping:
                continue
            if time.monotonic() - started < STARTUP_SECONDS:
                log.error(
                    "worker %d (pid %d) exited with %d while starting: stopping", index, pid, code
                )
                self._stop(signal.SIGTERM, None)
                continue
            log.error("worker %d (pid %d) exited with %d: forking another", index, pid, code)
            time.sleep(RESTART_DELAY_SECONDS)
            if not self.stopping:
                self._fork(index)
        return worst

    @staticmethod
    def _forget(pid: int) -> None:
        """A dead worker's live gauges leave the aggregate."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve_workers(settings: Settings, gateway: bool) -> int:
    """`settings.workers` forked workers of the embedded service (`gateway`: of the
    gateway); PROMETHEUS_MULTIPROC_DIR must be set before the metrics are imported."""
    if gateway:
        from service.api.gateway import build_app

        def app_of(worker_settings: Settings) -> FastAPI:
            return build_app(worker_settings)

    else:
        from service.api.embedded import build_app, load_bundle

        bundle = load_bundle(settings)

        def app_of(worker_settings: Settings) -> FastAPI:
            return build_app(worker_settings, bundle)

    gc.collect()
    gc.freeze()  # what is loaded now stays in shared pages: the collector will not touch it

    def run(index: int) -> int:
        worker = settings
        if index > 0:  # one trainer in the event group is enough
            worker = settings.model_copy(update={"online_trainer": "off"})
        return serve_http(app_of(worker), worker)

    return Supervisor(settings.workers, run).serve()
