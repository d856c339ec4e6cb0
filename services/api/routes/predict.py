"""``POST /predict``: one or more image files (multipart field ``file``) -> label, confidence, per-class."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from services.api.deps import ClassifierDep, SettingsDep
from services.api.errors import UnsupportedMediaType
from services.api.hangup import unless_client_leaves
from services.api.responses import JSONResponse
from services.api.uploads import read_uploads

router = APIRouter(tags=["predict"])

EXAMPLE = {
    "id": "0f8e1c2a9b7d4e6f8a1b2c3d4e5f6a7b",
    "label": "dandelion",
    "confidence": 0.9712,
    "low_confidence": False,
    "probabilities": {"dandelion": 0.9712, "grass": 0.0288},
    "model": {"name": "dandelion-grass", "version": "3"},
    "filename": "photo.jpg",
}

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
    "responses": {
        "200": {
            "description": "One result for one file; a list of results, in order, for several. `id` identifies "
            "the prediction for `POST /feedback`.",
            "content": {"application/json": {"example": EXAMPLE}},
        },
        "400": {"description": "Not an image, missing `file`, or too many files"},
        "413": {"description": "A file or the request is over the size limit"},
        "415": {"description": "Not multipart/form-data"},
        "503": {"description": "No model loaded yet"},
    },
}


@router.post("/predict", summary="Classify photos as dandelion or grass", openapi_extra=OPENAPI)
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
