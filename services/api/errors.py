"""One error hierarchy with status codes and MLflow-style codes, rendered in one place (see ``app.py``).

Messages never contain the request payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class ApiError(Exception):
    status_code = 500
    error_code = "INTERNAL_ERROR"
    headers: dict[str, str] | None = None
    """Response headers the status needs (``WWW-Authenticate`` for 401, ``Retry-After`` for 429)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error_code": self.error_code, "message": self.message}


class BadRequest(ApiError):
    status_code = 400
    error_code = "BAD_REQUEST"


class InvalidImage(BadRequest):
    error_code = "INVALID_IMAGE"


class PayloadTooLarge(ApiError):
    status_code = 413
    error_code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(ApiError):
    status_code = 415
    error_code = "UNSUPPORTED_MEDIA_TYPE"


class ModelNotReady(ApiError):
    status_code = 503
    error_code = "MODEL_NOT_READY"


class Overloaded(ApiError):
    status_code = 503
    error_code = "TEMPORARILY_UNAVAILABLE"


class Timeout(ApiError):
    status_code = 504
    error_code = "TIMEOUT"


class Unauthorized(ApiError):
    status_code = 401
    error_code = "UNAUTHENTICATED"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="feedback"'}


class RequestTimeout(ApiError):
    status_code = 408
    error_code = "REQUEST_TIMEOUT"


class TooManyRequests(ApiError):
    status_code = 429
    error_code = "TOO_MANY_REQUESTS"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, retry_after_s))}


class NotFound(ApiError):
    status_code = 404
    error_code = "RESOURCE_DOES_NOT_EXIST"


class Conflict(ApiError):
    status_code = 409
    error_code = "RESOURCE_CONFLICT"


class Unavailable(ApiError):
    status_code = 503
    error_code = "TEMPORARILY_UNAVAILABLE"


def refused_bare(work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``work(*args, **kwargs)``; an :class:`ApiError` it raises comes out without its traceback or the exception
    it replaced. Either keeps every frame's locals alive for as long as the error lives: the response to a
    refused 57 MiB body of strings held its simdjson document and a stripped copy (+378 MiB) until it was sent,
    after its parse turn had passed to the next request, so refusals queued behind one another piled up."""
    try:
        return work(*args, **kwargs)
    except ApiError as exc:
        refusal = exc
    refusal.__traceback__ = refusal.__context__ = refusal.__cause__ = None
    raise refusal
