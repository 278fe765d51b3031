"""`python -m service.probe [grpc|http]`: the container health check.

It runs every few seconds beside the server, so it imports only grpc and the settings (no
torch, no FAISS) and needs no probe binary in the image. Exit 0: healthy; 1: not.

- grpc (default): grpc.health.v1 Check of the whole server on RECSYS_GRPC_PORT; every tier
  answers SERVING only once it can work (models and index loaded; the online trainer: in
  its event group), NOT_SERVING while draining.
- http: GET /readyz on RECSYS_HTTP_PORT (the gateway and the embedded service).
"""

import sys
import urllib.request

TIMEOUT_SECONDS = 2.0


def grpc_status(port: int) -> str:
    """The server's overall health on `port`: "SERVING", another status, or the call's error."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def http_ok(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT_SECONDS):
            return True
    except OSError as exc:
        print(f"GET :{port}{path}: {exc}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    from service.settings import Settings

    check = argv[0] if argv else "grpc"
    settings = Settings()
    if check == "grpc":
        status = grpc_status(settings.grpc_port)
        healthy = status == "SERVING"
        if not healthy:
            print(f"gRPC health on :{settings.grpc_port}: {status}", file=sys.stderr)
    elif check == "http":
        healthy = http_ok(settings.http_port, "/readyz")
    else:
        print(f"usage: python -m service.probe [grpc|http], not {check!r}", file=sys.stderr)
        return 2
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
