"""Property-based fuzzing of every operation in our OpenAPI document (schemathesis), fake model behind it.

Whatever schemathesis generates, valid or not, no operation may answer 5xx, and every refusal is our
``{"error_code", "message"}`` JSON.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.api.fakes import FakeSource


@pytest.fixture
def openapi_schema(api_settings: ApiSettings, source: FakeSource) -> Iterator[Any]:
    # schemathesis runs the app's lifespan itself (on its own event-loop thread) once it loads the schema.
    app = create_app(api_settings, source=source)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    with asgi.get_client(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.02)
    yield schema
    asgi.shutdown_lifespans()


STATUSES: dict[str, set[int]] = {}
"""Statuses seen per operation, to show the fuzzer really reached every one."""


def errors_are_ours(ctx: Any, response: Any, case: Any) -> bool | None:
    """A refusal is rendered by our one error renderer, never by a framework default."""
    STATUSES.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
    if 400 <= response.status_code < 500:
        body = response.json()
        assert set(body) == {"error_code", "message"}, body
        assert body["error_code"] and body["message"]
    return None


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def fuzz(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error, errors_are_ours])


def test_no_operation_answers_5xx(openapi_schema: Any) -> None:
    # Hypothesis driven directly: schemathesis' own lazy pytest loader (``from_fixture``) does not work with
    # pytest 9 (it reads ``node._nodeid``), and loading the schema at import would start the app at collection.
    operations = [result.ok() for result in openapi_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/invocations", "/model", "/health/ready"}
    for operation in operations:
        given(case=operation.as_strategy())(fuzz)()
    assert set(STATUSES) == {f"{op.method.upper()} {op.path}" for op in operations}, STATUSES
