"""HTTP connections under uvicorn: every request's headers must arrive within a deadline.

uvicorn bounds the idle time *between* requests of a keep-alive connection, but not the time a client may
take to send a request's headers: a socket that connects and sends nothing, or half a request line, stays
open for good, and enough of them once held every slot of the concurrency limit (and failed the liveness
probe). :class:`HeaderDeadlineProtocol` closes a connection whose headers are not complete
``header_timeout_s`` after it opened (for its first request) or after the request's first byte (for the next
ones on a kept-alive connection): silently when nothing arrived, with a 408 when part of a request did.

The deadline travels on :class:`ServerConfig`, uvicorn's configuration, which worker processes receive
pickled (``--workers``), and uvicorn builds the protocol from its import string.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

PROTOCOL = "services.api.connections:HeaderDeadlineProtocol"
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration, served by :class:`HeaderDeadlineProtocol` with this header deadline."""

    def __init__(self, app: Any, *, header_timeout_s: float, **options: Any) -> None:
        self.header_timeout_s = header_timeout_s
        super().__init__(app, http=PROTOCOL, **options)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline on each request's headers."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.header_timeout_s: float = getattr(config, "header_timeout_s", 10.0)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._request_begun = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        self._arm()  # a kept-alive connection's next request: its headers get the full deadline again

    def on_headers_complete(self) -> None:
        self._disarm()
        self._request_begun = False
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self._request_begun:
            self.transport.write(REQUEST_TIMEOUT)
        log.debug("closing %s: no complete request headers within %g s", self.client, self.header_timeout_s)
        self.transport.close()
