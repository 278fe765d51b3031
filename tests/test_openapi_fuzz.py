"""The gateway's HTTP API fuzzed from its own OpenAPI schema (schemathesis): whatever a
client sends within or around the schema, no answer is a 5xx, every answer matches the
schema, and invalid requests are refused. A bounded number of examples per operation keeps
it to seconds.

One check is left out: schemathesis's "schema-valid request accepted". JSON Schema counts
5873.0 as an integer, and the API refuses it on purpose: ids are unsigned 64-bit, a JSON
float holds integers exactly only up to 2^53, so ids (and counts, alike) must be JSON
integers."""

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api.embedded import build_app
from service.settings import Settings

EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def api_schema(artifact_root):
    app = build_app(Settings(artifacts=artifact_root, grpc_port=0, index_poll_seconds=0))
    with TestClient(app):  # runs the lifespan: models loaded
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def operations(schema) -> dict[str, object]:
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[f"{operation.method.upper()} {operation.path}"] = operation
    return found


def test_the_schema_names_every_public_operation(api_schema):
    assert {
        "POST /v1/recommend",
        "POST /v1/candidates",
        "POST /v1/events",
        "GET /healthz",
        "GET /readyz",
    } <= set(operations(api_schema))


@pytest.mark.parametrize(
    "name",
    ["POST /v1/recommend", "POST /v1/candidates", "POST /v1/events", "GET /healthz", "GET /readyz"],
)
def test_no_server_errors_and_answers_match_the_schema(api_schema, name):
    operation = operations(api_schema)[name]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case):
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    check()
