"""Freed memory handed back to the system: glibc keeps what a big request freed unless it is told otherwise.

Two settings and one habit. ``mallopt`` caps the malloc arenas (each decoding or parsing thread otherwise gets
one, and freed memory stays spread over them) and fixes the mmap threshold at 1 MiB: glibc's threshold
otherwise rises after each large free, up to 32 MiB, so a request body or an image array, once mmapped and
returned at once, comes from the heap next time, where it stays after it is freed. And a trimmer
(:class:`IdleTrimmer`) calls ``malloc_trim`` once big work has been done and a second has passed, in a
thread: the heap's free pages go back, whatever the arena. Each is skipped where the C library is not glibc.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""glibc's ``mallopt`` parameter numbers (``malloc.h``)."""
MMAP_THRESHOLD = 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    return libc


def tune_malloc(arenas: int = 2, mmap_threshold: int = MMAP_THRESHOLD) -> dict[str, bool]:
    """Cap the arenas and fix the mmap threshold (as ``MALLOC_ARENA_MAX`` and ``MALLOC_MMAP_THRESHOLD_`` would),
    each unless the environment already sets it. Call before any thread starts. Which were set."""
    libc = _libc()
    done = {"arenas": False, "mmap_threshold": False}
    if libc is None:
        return done
    if "MALLOC_ARENA_MAX" not in os.environ:
        done["arenas"] = libc.mallopt(M_ARENA_MAX, arenas) == 1
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done["mmap_threshold"] = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    return done


def trim() -> bool:
    """Return the heap's free pages to the system now (``malloc_trim(0)``); False where there is no glibc."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


class IdleTrimmer:
    """``note(nbytes)`` after work that held a lot of memory; ``run()`` trims, in a thread, ``delay_s`` after such
    a note (one trim however many notes came in the meantime: under steady load, once every ``delay_s``)."""

    def __init__(self, threshold_bytes: int = 4 * 1024 * 1024, delay_s: float = 1.0) -> None:
        self.threshold_bytes = threshold_bytes
        self.delay_s = delay_s
        self.trims = 0
        self._pending = asyncio.Event()

    def note(self, nbytes: int) -> None:
        if nbytes >= self.threshold_bytes:
            self._pending.set()

    async def run(self) -> None:
        if _libc() is None:
            return
        while True:
            await self._pending.wait()
            self._pending.clear()
            await asyncio.sleep(self.delay_s)  # under steady load: once a second at most
            with contextlib.suppress(OSError):
                await asyncio.to_thread(trim)
                self.trims += 1
