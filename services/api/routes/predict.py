"""``POST /predict``: one or more image files (multipart field ``file``) -> label, confidence, per-class."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from services.api.deps import ClassifierDep, SettingsDep
from services.api.errors import UnsupportedMediaType
from services.api.hangup import unless_client_leaves
from services.api.responses import JSONResponse
from services.api.schemas import DEFAULT_ERROR, PREDICTION_EXAMPLES, Prediction, error
from services.api.uploads import read_uploads

router = APIRouter(tags=["predict"])

OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more photos (JPEG, PNG, WebP, GIF, BMP, TIFF).",
                        }
                    },
                }
            }
        },
    },
    "responses": {"200": {"content": {"application/json": {"examples": PREDICTION_EXAMPLES}}}},
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": Prediction | list[Prediction],
        "description": "One answer for one file; a list of answers, in order, for several. `id` identifies the "
        "prediction for `POST /feedback`.",
    },
    400: error("Not an image, missing `file`, or too many files"),
    413: error("A file or the request is over the size limit"),
    415: error("Not an accepted image format, or the request is not multipart/form-data"),
    503: error("No model loaded yet, or the server is busy"),
    504: error("The photo was not decoded or answered in time"),
    **DEFAULT_ERROR,
}


@router.post("/predict", summary="Classify photos as dandelion or grass", responses=RESPONSES, openapi_extra=OPENAPI)
async def predict(
    request: Request,
    classifier: ClassifierDep,
    settings: SettingsDep,
    explain: Annotated[
        bool, Query(description="Also return where the model looked: a grid of evidence and a translucent PNG.")
    ] = False,
) -> JSONResponse:
    started = time.perf_counter()
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("send the photo as multipart/form-data in the field 'file'")
    async with read_uploads(
        request,
        max_files=settings.max_files,
        max_file_bytes=settings.max_upload_bytes,
        max_request_bytes=settings.max_body_bytes,
        budget=request.app.state.body_budget,
    ) as uploads:
        client = request.client.host if request.client else "unknown"
        answers = await unless_client_leaves(
            request, classifier.classify(uploads, started, explain=explain, client=client)
        )
    body: Any = answers[0] if len(answers) == 1 else answers
    last = answers[-1]["model"]
    return JSONResponse(body, headers={"X-Model-Name": last["name"], "X-Model-Version": last["version"]})
