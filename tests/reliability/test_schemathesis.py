"""Property-based testing of every operation in our OpenAPI document (schemathesis) against the live app: the real
app on a real uvicorn server, with the fake model (answering every field: in-domain distance, P(neither), the
activation map) and a real prediction log, over HTTP.

Each operation gets its documented examples, then generated cases, valid and invalid. Whatever arrives, no
operation may answer 5xx, every answer must match the schema documented for its status (the response models of
``services/api/schemas.py``) with a documented content type, and every refusal is our ``{"error_code",
"message"}`` JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.api.fakes import FakeSource
from tests.api.process import app_in_thread
from tests.api.test_app import png


@pytest.fixture
def live(api_settings: ApiSettings) -> Iterator[str]:
    source = FakeSource()
    source.domain_threshold, source.neither_threshold, source.explains = 0.3, 0.5, True
    settings_ = api_settings.model_copy(update={"feedback_rate_per_minute": 0.0})  # fuzzing is not one user
    with app_in_thread(create_app(settings_, source=source)) as url:
        yield url


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


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    errors_are_ours,
]
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


def test_every_operation_answers_as_documented(live: str) -> None:
    # Hypothesis driven directly: schemathesis' own lazy pytest loader (``from_fixture``) does not work with
    # pytest 9 (it reads ``node._nodeid``), and loading the schema at import would need the server at collection.
    schema = schemathesis.openapi.from_url(f"{live}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert paths >= {"/predict", "/invocations", "/feedback", "/model", "/model/card", "/health/ready", "/ping"}

    examples = 0
    for operation in operations:
        strategies = operation.get_strategies_from_examples()
        examples += len(strategies)
        for strategy in strategies:
            SETTINGS(given(case=strategy)(check))()
        takes = [operation.path_parameters, operation.headers, operation.cookies, operation.query, operation.body]
        # Nothing to get wrong in a request with no inputs (GET /health/live): no invalid case exists.
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
        for mode in modes if any(len(c) for c in takes) else modes[:1]:
            SETTINGS(given(case=operation.as_strategy(mode))(check))()
    assert examples >= 3, "the documented request examples (/invocations, /feedback) were not run"
    assert set(STATUSES) == {f"{op.method.upper()} {op.path}" for op in operations}, STATUSES
    print({operation: sorted(statuses) for operation, statuses in sorted(STATUSES.items())})
    # Generated uploads are not photos, nor generated arrays 224 x 224 images: their 200s are checked below.


def check(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


def conforms(schema: Any, response: httpx.Response) -> None:
    """Raise unless ``response`` matches what the document says its operation answers with its status."""
    response.request.read()  # a multipart upload is streamed: schemathesis reads the request back
    schema[response.request.url.path][response.request.method].validate_response(response)


def test_real_answers_match_the_documented_models(live: str) -> None:
    """What generation rarely reaches, validated against the document: answers to real photos (with and without
    the map, in domain, unlike the training photos, a refused kind), MLflow scores, both feedback answers."""
    schema = schemathesis.openapi.from_url(f"{live}/openapi.json")
    photos = [png((250, 220, 20)), png((255, 255, 255)), png((230, 40, 80))]  # in domain, unlike, refused kind
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(photos)]
    with httpx.Client(base_url=live, timeout=30) as client:
        for explain in ("false", "true"):
            response = client.post("/predict", params={"explain": explain}, files=files)
            assert response.status_code == 200
            conforms(schema, response)  # raises on any violation of the schema
            answers = response.json()
            assert [a["out_of_domain_reason"] for a in answers] == [None, "unlike_training_photos",
                                                                    "looks_like_refused_kind"]  # fmt: skip
            assert all(("explain" in a) == (explain == "true") for a in answers)
        one = client.post("/predict", files=files[:1])
        conforms(schema, one)
        assert isinstance(one.json(), dict)  # one file: one answer, not a list

        x = np.full((1, 224, 224, 3), 0.5, np.float32)
        scores = client.post("/invocations", content=orjson.dumps({"inputs": x}, option=orjson.OPT_SERIALIZE_NUMPY),
                             headers={"content-type": "application/json"})  # fmt: skip
        assert scores.status_code == 200
        conforms(schema, scores)

        for status in (201, 200):  # recorded, then the same label again: unchanged
            told = client.post("/feedback", json={"prediction_id": answers[1]["id"], "label": "neither"})
            assert told.status_code == status, told.text
            conforms(schema, told)
        assert told.json()["domain_outcome"] == "confirmed_out_of_domain"
        for path in ("/model", "/health/ready", "/health/live"):
            conforms(schema, client.get(path))
