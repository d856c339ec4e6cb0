"""Multipart uploads read as they stream in, each limit checked on every chunk: nothing past a limit is held.

Starlette's form parser spooled every part to a temporary file in full before the route could look at its
size: 16 clients sending 60 MiB each put 962 MiB in ``/tmp`` (a 1 GiB volume in the pod) before each got its
413. Here the photo bytes go to memory only (the decoder reads them from memory anyway, so a disk spool was
one more copy), and three limits stop a part mid-stream: one file's size, one request's, and the bytes all
requests in progress hold together (:class:`BodyBudget`), so the worst case is a number the settings state.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from services.api.errors import BadRequest, Overloaded, PayloadTooLarge
from services.api.middleware import human_bytes
from services.api.service import Upload

FIELD = "file"
MAX_TEXT_PART_BYTES = 1024
"""A text part (a form field that is no file) is never needed; a short one is tolerated and dropped."""
MAX_PART_HEADER_BYTES = 4096
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


class BodyBudget:
    """The bytes of request bodies (uploads, ``/invocations`` JSON) all requests in progress may hold at once;
    beyond it a request answers 503 at once (with ``Retry-After``) instead of growing the process.

    A quarter is kept for small bodies (up to ``small_bytes`` each: a photo, one image's JSON): big bodies
    together may fill only the rest, so a few of them cannot turn ordinary requests away."""

    def __init__(
        self, total: int, on_release: Callable[[int], None] | None = None, small_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self.total = total
        self.small_bytes = small_bytes
        self.held = 0
        self.peak = 0
        self.on_release = on_release
        """Told how many bytes a request gave back (the app trims the heap after big ones)."""

    def take(self, n: int, already: int = 0) -> None:
        """Count ``n`` more bytes of a request that holds ``already``."""
        limit = self.total if already + n <= self.small_bytes else self.total - self.total // 4
        if self.held + n > limit:
            error = Overloaded(
                f"the server holds {human_bytes(self.total)} of request bodies in progress, its limit; retry shortly"
            )
            error.headers = {"Retry-After": "1"}
            raise error
        self.held += n
        self.peak = max(self.peak, self.held)

    def give(self, n: int) -> None:
        self.held -= n
        if self.on_release is not None:
            self.on_release(n)


@dataclass
class _Part:
    name: str | None = None
    filename: str | None = None
    is_file: bool = False
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _Form:
    """What the parser's callbacks build, limits checked as each piece arrives."""

    max_files: int
    max_file_bytes: int
    max_request_bytes: int
    budget: BodyBudget
    parts: list[_Part] = field(default_factory=list)
    held: int = 0
    header_name: bytes = b""
    header_value: bytes = b""
    header_bytes: int = 0
    disposition: bytes = b""

    def part_begin(self) -> None:
        if len(self.parts) >= self.max_files + 8:
            raise BadRequest(f"too many form parts; send at most {self.max_files} files in the field 'file'")
        self.parts.append(_Part())
        self.header_bytes = 0
        self.disposition = b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.header_name += data[start:end]

    def header_value_(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.header_value += data[start:end]

    def _header_bytes(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_PART_HEADER_BYTES:
            raise BadRequest(f"a form part's headers are over {human_bytes(MAX_PART_HEADER_BYTES)}")

    def header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def headers_finished(self) -> None:
        part = self.parts[-1]
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise BadRequest('every form part needs a Content-Disposition with a "name"')
        part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            part.is_file = True
            part.filename = options[b"filename"].decode("utf-8", "replace")
            if part.name == FIELD and sum(p.is_file and p.name == FIELD for p in self.parts) > self.max_files:
                raise BadRequest(f"too many files; at most {self.max_files} per request")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        n = end - start
        if part.name != FIELD:
            if not part.is_file and len(part.data) + n > MAX_TEXT_PART_BYTES:
                raise BadRequest(f"a text field is over {MAX_TEXT_PART_BYTES} bytes")
            if part.is_file:
                return  # a file in another field: not ours to keep
        if part.is_file and len(part.data) + n > self.max_file_bytes:
            name = safe_filename(part.filename) or "a file"
            raise PayloadTooLarge(f"{name} is over the limit of {human_bytes(self.max_file_bytes)}")
        if self.held + n > self.max_request_bytes:
            raise PayloadTooLarge(f"the files are over the limit of {human_bytes(self.max_request_bytes)} a request")
        self.budget.take(n, self.held)
        self.held += n
        part.data += data[start:end]


@asynccontextmanager
async def read_uploads(
    request: Request,
    *,
    max_files: int,
    max_file_bytes: int,
    max_request_bytes: int,
    budget: BodyBudget,
) -> AsyncIterator[list[Upload]]:
    """The request's ``file`` parts as :class:`Upload` s; their bytes count against ``budget`` until the block
    ends. Raises the API's errors (400, 413, 503) as soon as a chunk breaks a rule."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("the multipart body has no boundary")
    form = _Form(max_files, max_file_bytes, max_request_bytes, budget)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": form.part_begin,
            "on_part_data": form.part_data,
            "on_header_field": form.header_field,
            "on_header_value": form.header_value_,
            "on_header_end": form.header_end,
            "on_headers_finished": form.headers_finished,
        },
    )
    try:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except FormParserError:
            raise BadRequest("the body is not valid multipart/form-data") from None
        ended = parser.state.name == "END"
        if not ended:
            raise BadRequest("the multipart body ends before its closing boundary")
        files = [part for part in form.parts if part.name == FIELD]
        if not files:
            raise BadRequest("the form has no 'file' field: send the photo as file=@photo.jpg")
        if not all(part.is_file for part in files):
            raise BadRequest("'file' must be a file upload, not a text field")
        uploads = [Upload(safe_filename(part.filename), bytes(part.data)) for part in files]
        for part in form.parts:
            part.data = bytearray()
        yield uploads
    finally:
        budget.give(form.held)
