"""Where labelled photos come from: local folders, an HTTP base URL, and uploads that users labelled.

A source is written ``[name=]location``: a folder or an ``http(s)://`` base, optionally named (the name is what
cross-source estimates and the model card group photos by; by default a folder's own name). Several sources feed
one feature store: ``--source A --source B`` or ``DATA_SOURCE=A,B``.

* **A folder** gives every photo of its subfolders: ``dandelion/`` and ``grass/`` are the two classes, and every
  other subfolder (``daisy/``, ``rose/``, ``cat/``, ...) holds photos of *neither*, which the model learns to
  refuse; the subfolder's name is kept as the photo's ``kind``. Nothing is left out unless a limit per label is
  asked for, and the summary says what it left out.
* **An HTTP base** is read as ``{base}/{label}/{i:08d}.jpg`` for i below a count per label (it cannot be
  listed), with bounded retries and backoff.
* **Feedback**: the uploads the API kept whose prediction got a label through ``POST /feedback``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from shared.labels import LABELS, NEITHER
from shared.settings import DEFAULT_DATA_SOURCE
from shared.storage import ObjectStore, ObjectStoreError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
DEFAULT_SOURCE_NAME = "dandelion-grass"
"""The name of the upstream data set (:data:`shared.settings.DEFAULT_DATA_SOURCE`)."""


class SourceError(RuntimeError):
    """The source cannot be read at all, or holds no image."""


@dataclass(frozen=True, slots=True)
class Candidate:
    label: str
    location: str
    """Where the reader fetches the file from."""
    kind: str
    """What the photo shows within its label (the label itself for dandelion and grass)."""
    origin: str
    """The source's name."""
    recorded_source: str | None = None
    """What the ``images`` row records as its source, when not ``location`` (``feedback:{prediction_id}``)."""


class Missing(Exception):
    """The source has no file at this location (HTTP 404): tolerated, counted."""


class FetchFailed(Exception):
    """The file could not be fetched after retries."""


def split_sources(text: str) -> list[str]:
    """``DATA_SOURCE``'s comma-separated list."""
    return [part.strip() for part in text.split(",") if part.strip()]


def source_name(spec: str) -> tuple[str, str]:
    """``[name=]location`` -> ``(name, location)``; unnamed folders are named after themselves."""
    name, sep, location = spec.partition("=")
    if sep and name and "/" not in name and ":" not in name:
        return name.strip(), location.strip()
    location = spec.strip()
    if location.rstrip("/") == DEFAULT_DATA_SOURCE.rstrip("/"):
        return DEFAULT_SOURCE_NAME, location
    if location.startswith(("http://", "https://")):
        parsed = urlparse(location)
        return f"{parsed.netloc}{parsed.path}".rstrip("/").rsplit("/", 1)[-1] or parsed.netloc, location
    return Path(location).expanduser().resolve().name or "folder", location


class FolderSource:
    """``root/{label}/*``: dandelion/ and grass/ for the classes, any other subfolder for photos of neither."""

    def __init__(self, root: Path, name: str, per_label: int | None = None) -> None:
        self.root = root
        self.name = name
        self.per_label = per_label
        self.left_out: dict[str, int] = {}
        """Files a ``per_label`` limit left out, by subfolder (shown in the summary)."""

    def _folders(self) -> Iterator[tuple[str, str, Path]]:
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            label = folder.name if folder.name in LABELS else NEITHER
            yield label, folder.name, folder

    def candidates(self) -> list[Candidate]:
        if not self.root.is_dir():
            raise SourceError(
                f"source folder {self.root} does not exist: give --source a folder with dandelion/ and grass/ "
                "subfolders of photos (any other subfolder holds photos of neither), or leave --source out to "
                "download the upstream photos"
            )
        found: list[Candidate] = []
        for label, kind, folder in self._folders():
            # The limit is per subfolder: each class, and each kind of photo of neither (daisy/, rose/, ...),
            # so a limit never leaves a kind out because another one sorts before it.
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            kept = files if self.per_label is None else files[: self.per_label]
            if len(kept) < len(files):
                self.left_out[kind] = len(files) - len(kept)
            found.extend(Candidate(label, str(p.resolve()), kind, self.name) for p in kept)
        if not any(c.label in LABELS for c in found):
            raise SourceError(
                f"source folder {self.root} has no photos under {'/ or '.join(LABELS)}/: put the photos of each class "
                "in a subfolder named after it (other subfolders hold photos of neither)"
            )
        return found

    async def fetch(self, candidate: Candidate) -> bytes:
        return await asyncio.to_thread(Path(candidate.location).read_bytes)

    async def close(self) -> None:
        pass


class HttpSource:
    """``{base}/{label}/{i:08d}.jpg`` for i < per_label, fetched with bounded retries and backoff."""

    def __init__(self, base: str, name: str, per_label: int, *, attempts: int, timeout_s: float, concurrency: int):
        self.base = base.rstrip("/")
        self.name = name
        self.per_label = per_label
        self.attempts = attempts
        self.client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=True,
            limits=httpx.Limits(max_connections=concurrency),
            headers={"User-Agent": "dandelion-grass-trainer"},
        )
        self.last_index_found: set[str] = set()
        """Labels whose last index exists: the source may hold more than ``per_label`` (said in the summary)."""

    def candidates(self) -> list[Candidate]:
        return [
            Candidate(label, f"{self.base}/{label}/{i:08d}.jpg", label, self.name)
            for label in LABELS
            for i in range(self.per_label)
        ]

    async def fetch(self, candidate: Candidate) -> bytes:
        delay = 0.25
        for attempt in range(1, self.attempts + 1):
            try:
                response = await self.client.get(candidate.location)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code == 404:
                    raise Missing(candidate.location)
                if response.is_success:
                    if candidate.location.endswith(f"/{self.per_label - 1:08d}.jpg"):
                        self.last_index_found.add(candidate.label)
                    return response.content
                problem = f"HTTP {response.status_code}"
                if response.status_code not in RETRY_STATUSES:
                    break
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        raise FetchFailed(f"{candidate.location}: {problem}")

    async def probe(self) -> None:
        """Fail fast, with one clear line, when the base URL cannot be reached at all."""
        first = f"{self.base}/{LABELS[0]}/{0:08d}.jpg"
        try:
            await self.client.head(first)
        except httpx.TransportError as exc:
            raise SourceError(
                f"source {self.base} is unreachable: {type(exc).__name__}: {exc} (without internet, give --source a "
                "folder with dandelion/ and grass/ subfolders of photos)"
            ) from None

    async def close(self) -> None:
        await self.client.aclose()


class FeedbackSource:
    """Uploads the API kept in the object store (``uploads/...``) whose prediction got a feedback label."""

    name = "feedback"

    def __init__(self, store: ObjectStore, candidates: list[Candidate]) -> None:
        self.store = store
        self._candidates = candidates

    def candidates(self) -> list[Candidate]:
        return self._candidates

    async def fetch(self, candidate: Candidate) -> bytes:
        try:
            return await self.store.get(candidate.location)
        except ObjectStoreError:
            # Gone (an expiry rule on uploads/, a manual clean-up) is counted; an unreachable store is fatal.
            if not await self.store.exists(candidate.location):
                raise Missing(candidate.location) from None
            raise

    async def close(self) -> None:
        pass


Reader = FolderSource | HttpSource | FeedbackSource


def open_source(
    spec: str, per_label: int | None, *, http_per_label: int, attempts: int, timeout_s: float, concurrency: int
) -> FolderSource | HttpSource:
    """The reader of ``spec``; ``per_label`` limits a folder only when given (an HTTP base always has a count)."""
    name, location = source_name(spec)
    if location.startswith(("http://", "https://")):
        count = per_label or http_per_label
        return HttpSource(location, name, count, attempts=attempts, timeout_s=timeout_s, concurrency=concurrency)
    return FolderSource(Path(location).expanduser(), name, per_label)
