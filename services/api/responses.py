"""A JSON response rendered by orjson (FastAPI's own ORJSONResponse is deprecated).

A subclass of Starlette's JSONResponse, so FastAPI documents a route's answer by its response model alone
(with any other class it adds ``"type": "string"`` beside the model's schema).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse as StarletteJSONResponse


class JSONResponse(StarletteJSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
