"""``POST /invocations``: the MLflow scoring protocol, answering as ``mlflow models serve`` does."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.api.deps import ClassifierDep, SettingsDep
from services.api.errors import PayloadTooLarge
from services.api.hangup import unless_client_leaves
from services.api.middleware import human_bytes
from services.api.protocol import check_content_type
from services.api.schemas import DEFAULT_ERROR, Scores, error
from services.api.uploads import BodyBudget

router = APIRouter(tags=["mlflow"])

OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "Exactly one of inputs, instances, dataframe_split, dataframe_records.",
                    "properties": {
                        "inputs": {"type": "array", "description": "Images as (n, 224, 224, 3) floats in [0, 1]"},
                        "instances": {"type": "array"},
                        "dataframe_split": {"type": "object"},
                        "dataframe_records": {"type": "array"},
                        "params": {"type": "object"},
                    },
                },
                # Real requests carry 224 x 224 pixels per image; a whole one would make the schema 700 KB.
                "example": {"inputs": [[[[0.2, 0.5, 0.1], [0.3, 0.6, 0.1]], [[0.2, 0.4, 0.1], [0.9, 0.8, 0.2]]]]},
            }
        },
    },
}


@asynccontextmanager
async def read_body(request: Request, limit: int, budget: BodyBudget) -> AsyncIterator[bytes]:
    """The body, refused as soon as it passes ``limit`` bytes (declared or streamed) or the bytes of all bodies
    in progress pass ``budget`` (503); its bytes count against the budget until the block ends."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the limit of {human_bytes(limit)}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            if size + len(chunk) > limit:
                raise PayloadTooLarge(f"the body is over the limit of {human_bytes(limit)}")
            budget.take(len(chunk), size)
            size += len(chunk)
            chunks.append(chunk)
        body = b"".join(chunks)
        chunks.clear()
        yield body
    finally:
        budget.give(size)


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Scores, "description": "Class probabilities per image, in the order dandelion, grass"},
    400: error("Bad input"),
    413: error("Body over the size limit, or too many images"),
    415: error("Not application/json (UTF-8)"),
    503: error("No model loaded yet, or the server is busy"),
    504: error("The model did not answer in time"),
    **DEFAULT_ERROR,
}


@router.post("/invocations", summary="MLflow-compatible scoring", responses=RESPONSES, openapi_extra=OPENAPI)
async def invocations(request: Request, classifier: ClassifierDep, settings: SettingsDep) -> Response:
    started = time.perf_counter()
    check_content_type(request.headers.get("content-type"))
    async with read_body(request, settings.max_body_bytes, request.app.state.body_budget) as body:
        content, model, ids, in_domain = await unless_client_leaves(request, classifier.invocations(body, started))
    # The body stays exactly MLflow's; the ids (for POST /feedback) and whether each input looks like the
    # training photos travel in headers, in input order.
    headers = {"X-Model-Name": model.name, "X-Model-Version": model.version, "X-Prediction-Ids": ",".join(ids)}
    if in_domain is not None:
        headers["X-In-Domain"] = ",".join("true" if flag else "false" for flag in in_domain)
    return Response(content, media_type="application/json", headers=headers)
