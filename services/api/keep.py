"""Which uploads are kept (``API_STORE_UPLOADS``): at most so many bytes a client and so many in all, per hour.

One client once stored 181 MiB in 7 s. Past a client's share, or past the replica's total, a prediction is
still answered and logged, only without its photo (counted as ``prediction_log_uploads_dropped{reason="quota"}``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW_S = 3600.0
MAX_CLIENTS = 100_000
"""Clients tracked in one window; beyond it a new client's uploads are not kept (the table stays bounded)."""


class UploadQuota:
    def __init__(self, per_client_bytes: int, total_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_client_bytes = per_client_bytes
        self.total_bytes = total_bytes
        self.clock = clock
        self._window_start = clock()
        self._total = 0
        self._by_client: dict[str, int] = {}

    def allow(self, client: str, nbytes: int) -> bool:
        """Whether ``client``'s upload of ``nbytes`` may be kept; if so, it is counted."""
        now = self.clock()
        if now - self._window_start >= WINDOW_S:
            self._window_start, self._total = now, 0
            self._by_client.clear()
        used = self._by_client.get(client)
        if used is None and len(self._by_client) >= MAX_CLIENTS:
            return False
        used = used or 0
        if used + nbytes > self.per_client_bytes or self._total + nbytes > self.total_bytes:
            return False
        self._by_client[client] = used + nbytes
        self._total += nbytes
        return True
