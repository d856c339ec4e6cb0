"""A JSON response rendered by orjson (FastAPI's own ORJSONResponse is deprecated), never sniffed as anything else.

A subclass of Starlette's JSONResponse, so FastAPI documents a route's answer by its response model alone
(with any other class it adds ``"type": "string"`` beside the model's schema).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse as StarletteJSONResponse

NOSNIFF = {"X-Content-Type-Options": "nosniff"}
"""A browser must not read an answer (errors quote what the client sent, briefly) as HTML or script."""


class JSONResponse(StarletteJSONResponse):
    media_type = "application/json"

    def __init__(
        self,
        content: Any,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        super().__init__(content, status_code, {**NOSNIFF, **(headers or {})}, media_type, background)

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
