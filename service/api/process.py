"""The lifecycle every serving process shares: the embedded service and the gateway (HTTP
and gRPC), the retrieval and ranking tiers and the online trainer (gRPC and /metrics).

1. gRPC (the process's services, grpc.health.v1, reflection) starts first and says
   NOT_SERVING, so probes find the process before it can answer;
2. the process loads what it serves into `Served` (models, index, tables, tier clients);
   calls before that get UNAVAILABLE / 503;
3. health says SERVING and `recsys_ready` is 1;
4. on stop (SIGTERM or SIGINT; uvicorn's shutdown for the HTTP processes) health says
   NOT_SERVING while calls are still answered for `notice` seconds (readiness probes take
   the replica out of its Service), then the server stops taking calls (GOAWAY: clients
   send new ones to other replicas), calls in flight get `grace` seconds to finish, and
   what was loaded is closed.
"""

import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import fields

import anyio.to_thread
from fastapi import APIRouter, FastAPI
from prometheus_client import start_http_server

from service.api.grpc_server import GrpcServer
from service.api.http import create_app
from service.api.served import Served
from service.metrics import READY
from service.settings import Settings

log = logging.getLogger(__name__)

# The servicers of a process, given the `Served` they read on every call.
Services = Callable[[Served], list]


class ServingProcess:
    def __init__(self, settings: Settings, services: Services, workers: int | None = None):
        """gRPC on `settings.grpc_port` (none when 0) with `services(self.served)`;
        `workers`: its thread pool (default `settings.grpc_workers`)."""
        self.settings = settings
        self.served = Served()
        self.grpc: GrpcServer | None = None
        if settings.grpc_port:
            address = f"{settings.host}:{settings.grpc_port}"
            self.grpc = GrpcServer(
                services(self.served),
                address,
                workers or settings.grpc_workers,
                settings.max_in_flight,
            )

    def start(self) -> None:
        if self.grpc is not None:
            self.grpc.start()
            log.info("gRPC listening on %s:%d", self.settings.host, self.grpc.port)

    def serve(self, loaded: Served) -> None:
        """Answer with `loaded` from now on: SERVING, ready."""
        for part in fields(Served):
            setattr(self.served, part.name, getattr(loaded, part.name))
        READY.set(1)
        if self.grpc is not None:
            self.grpc.set_serving(True)

    def stop(self, grace: float, notice: float = 0.0) -> None:
        READY.set(0)
        if self.grpc is not None:
            self.grpc.stop(grace, notice)
        self.served.close()


def wait_for_stop(served: Served, stop: threading.Event) -> None:
    """What a tier does between loading and stopping: answer calls (in gRPC's threads)."""
    stop.wait()


def run_until_stopped(
    process: ServingProcess,
    load: Callable[[], Served],
    metrics_port: int,
    grace: float,
    notice: float,
    work: Callable[[Served, threading.Event], None] = wait_for_stop,
) -> None:
    """Run a process without HTTP routes: /metrics on `metrics_port` (0: none), gRPC, `load`,
    then `work` until SIGTERM or SIGINT sets its event; then stop (`ServingProcess.stop`)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if metrics_port:
        start_http_server(metrics_port, addr=process.settings.host)
        log.info("/metrics on %s:%d", process.settings.host, metrics_port)
    process.start()
    try:
        process.serve(load())
        work(process.served, stop)
        log.info("stopping: draining calls in flight")
    finally:
        process.stop(grace, notice)


HTTP_PROCESS_GRACE_SECONDS = 5.0  # gRPC calls in flight when uvicorn shuts the app down


def http_app(
    settings: Settings,
    load: Callable[[Settings], Served],
    services: Services,
    routers: list[APIRouter] = (),
) -> FastAPI:
    """An HTTP process (the embedded service, the gateway): the HTTP app with `routers`
    added, whose lifespan runs a `ServingProcess` with `services` and puts what `load` gives
    on `app.state` for the routes."""
    process = ServingProcess(settings, services)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Handlers run in anyio's thread pool: let it hold every request the limit admits.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.max_in_flight)
        app.state.pipeline = app.state.online = app.state.admin = None
        process.start()
        try:
            process.serve(load(settings))
            app.state.pipeline, app.state.online, app.state.admin = (
                process.served.pipeline,
                process.served.online,
                process.served.admin,
            )
            yield
        finally:
            process.stop(HTTP_PROCESS_GRACE_SECONDS)

    app = create_app(lifespan, settings.max_in_flight, settings.max_body_bytes)
    for router in routers:
        app.include_router(router)
    return app
