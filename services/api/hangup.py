"""Work for a client that hung up is dropped: a request waiting in the batch queue is cancelled, not classified.

Starlette runs a route to its end even when its client has gone: its queued images were classified, counted as
served (2xx) and logged, for nobody. :func:`unless_client_leaves` watches the connection while the work runs
and cancels the work when the server reports the hang-up (``http.disconnect``); the batcher skips a cancelled
item, and the request is counted as 499 (see ``app.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request

T = TypeVar("T")


async def _hung_up(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; raises :class:`ClientDisconnect` (and cancels ``work``) if the client leaves first.
    Call it once the request's body has been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_hung_up(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnect()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
