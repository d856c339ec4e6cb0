"""``POST /predict``: one or more image files (multipart field ``file``) -> label, confidence, per-class."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile

from services.api.deps import ClassifierDep, SettingsDep
from services.api.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from services.api.middleware import human_bytes
from services.api.responses import JSONResponse
from services.api.schemas import DEFAULT_ERROR, PREDICTION_EXAMPLES, Prediction, error
from services.api.service import Upload

router = APIRouter(tags=["predict"])

MAX_FILENAME = 100
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
"""Control characters, zero-width characters and bidirectional overrides: nothing a file name needs."""


def safe_filename(name: str | None) -> str | None:
    """The upload's base name as it may be echoed back: no folders, no control or direction characters,
    at most 100 characters (the page renders it as text only, but other clients may not)."""
    if not name:
        return None
    base = UNPRINTABLE.sub("", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    if len(base) > MAX_FILENAME:
        _, dot, ext = base.rpartition(".")
        keep = ext if dot and len(ext) <= 10 else ""
        base = base[: MAX_FILENAME - len(keep) - 2] + "…" + (f".{keep}" if keep else "")
    return base or None


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
    form = await request.form(max_files=settings.max_files, max_fields=settings.max_files + 8)
    try:
        parts = form.getlist("file")
        if not parts:
            raise BadRequest("the form has no 'file' field: send the photo as file=@photo.jpg")
        uploads: list[Upload] = []
        for part in parts:
            if not isinstance(part, UploadFile):
                raise BadRequest("'file' must be a file upload, not a text field")
            if part.size is not None and part.size > settings.max_upload_bytes:
                name = safe_filename(part.filename) or "a file"
                raise PayloadTooLarge(f"{name} is over the limit of {human_bytes(settings.max_upload_bytes)}")
            uploads.append(Upload(safe_filename(part.filename), await part.read()))
    finally:
        await form.close()
    answers = await classifier.classify(uploads, started, explain=explain)
    body: Any = answers[0] if len(answers) == 1 else answers
    last = answers[-1]["model"]
    return JSONResponse(body, headers={"X-Model-Name": last["name"], "X-Model-Version": last["version"]})
