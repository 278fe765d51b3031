"""The HTTP app's ASGI middlewares, outermost first: request metrics, load shedding, body
size limit. Plain ASGI rather than Starlette's BaseHTTPMiddleware, which costs a task and a
stream per request."""

import contextlib
import time

from fastapi.responses import JSONResponse

from service.metrics import REQUEST_LATENCY, REQUESTS, SHED


class RequestMetrics:
    """Counts and times every HTTP request by route and status (refusals included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            REQUESTS.labels("http", endpoint, str(status[0])).inc()
            REQUEST_LATENCY.labels("http", endpoint).observe(time.perf_counter() - started)


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413: by Content-Length before reading,
    or while reading a body sent without one (chunked), so a large body is never buffered."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = JSONResponse({"detail": f"request body over {self.limit} bytes"}, 413)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await refusal(scope, receive, send)
        received, refused = 0, False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not refused:
                refused = True
                await refusal(scope, receive, send)
                raise BodyTooLarge()
            return message

        async def send_unless_refused(message):
            if not refused:  # the app's own answer to the aborted read is dropped
                await send(message)

        with contextlib.suppress(BodyTooLarge):  # answered 413 already
            await self.app(scope, counting_receive, send_unless_refused)


class BodyTooLarge(Exception):
    """The body went over the limit while being read (already answered with 413)."""


class InFlightLimit:
    """Load shedding: at most `limit` /v1/ requests at once; the next ones get 429 with
    Retry-After at once, instead of waiting in a queue past their deadline. Health and
    metrics are not limited. (One event loop runs this, so a plain counter is safe.)"""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            SHED.labels("http").inc()
            refusal = JSONResponse(
                {"detail": f"over {self.limit} requests in flight; retry"},
                429,
                {"Retry-After": "1"},
            )
            return await refusal(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
