"""``python -m services.trainer embed``: compute the embeddings a feature set still lacks, in shards.

The photos of the feature set whose views are not in the embedding store yet are split by hash into ``--shards N``
parts; ``--shard I`` computes part I (in Kubernetes an Indexed Job's pod reads I from ``JOB_COMPLETION_INDEX``), and
``--workers N`` runs the N parts as local processes (spawned with the caller's settings). Each part is written in
shards of ``TRAINER_EMBED_SHARD_PHOTOS`` photos, every one complete and recorded before the next starts: a part
killed mid-way loses only the shard in hand, and a rerun computes exactly what is still missing. One image is one
pass of the LiteRT extractor, so the embeddings do not depend on how the work was split.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from services.trainer import embeddings
from services.trainer.extractor import TRAINING_VIEWS, EmbeddingSpec, Extractor, build_flatbuffer, view_arrays
from services.trainer.features import load_feature_set
from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.images import ImageError
from shared.storage import open_store

LOOKAHEAD = 8
"""Photos decoded ahead of the extractor, in threads (their arrays are 1.8 MB each)."""


class EmbedError(RuntimeError):
    """A part failed (a worker process exited with an error)."""


@dataclass(frozen=True, slots=True)
class Todo:
    sha256: str
    object_key: str
    views: tuple[str, ...]


@dataclass
class EmbedReport:
    photos: int
    """Photos in the feature set."""
    todo: int
    """Photos of this part that lacked a view when it started."""
    computed: int = 0
    """Views computed and recorded here."""
    failed: int = 0
    shard: int | None = None
    shards: int = 1
    workers: int = 1
    seconds: float = 0.0

    def summary(self) -> str:
        part = f" (part {self.shard} of {self.shards})" if self.shard is not None and self.shards > 1 else ""
        by = f" by {self.workers} processes" if self.workers > 1 else ""
        if not self.todo:
            return f"embed{part}: all {self.photos} photos already have their embeddings"
        rate = f", {self.seconds / max(self.computed, 1) * 1000:.1f} ms a view" if self.computed else ""
        failed = f"; {self.failed} could not be read (left out)" if self.failed else ""
        return (
            f"embed{part}: {self.computed} views of {self.todo} photos computed{by} in {self.seconds:.0f} s{rate} "
            f"({self.photos - self.todo} of {self.photos} photos already had theirs){failed}"
        )


def shard_of(sha256: str, shards: int) -> int:
    return int(sha256[:8], 16) % shards


def spec_of(settings: TrainerSettings) -> EmbeddingSpec:
    return EmbeddingSpec.of(settings.backbone, settings.resolution)


async def plan(settings: TrainerSettings, feature_set_version: int | None = None) -> tuple[int, list[Todo]]:
    """How many photos the feature set has, and which of them lack which views."""
    _, table = await load_feature_set(settings, feature_set_version)
    table = table.sort_by("sha256")
    hashes = table["sha256"].to_pylist()
    keys = table["object_key"].to_pylist()
    fraction = embeddings.sample_fraction(len(hashes))
    async with open_database(settings.database) as sessions:
        known = await embeddings.known(sessions, spec_of(settings))
    todo = []
    for sha, key in zip(hashes, keys, strict=True):
        wanted = TRAINING_VIEWS + (("small",) if embeddings.in_sample(sha, fraction) else ())
        missing = tuple(v for v in wanted if v not in known.get(sha, ()))
        if missing:
            todo.append(Todo(sha, key, missing))
    return len(hashes), todo


def embed(
    settings: TrainerSettings,
    feature_set_version: int | None = None,
    *,
    shard: int | None = None,
    shards: int = 1,
    workers: int = 1,
    progress: bool = True,
) -> EmbedReport:
    """Compute the missing embeddings of the feature set (all of them, or part ``shard`` of ``shards``)."""
    started = time.perf_counter()
    if shard is None and workers > 1:
        report = _in_processes(settings, feature_set_version, workers, progress)
    else:
        report = asyncio.run(_embed_part(settings, feature_set_version, shard, shards, progress))
    report.seconds = time.perf_counter() - started
    return report


def _in_processes(settings: TrainerSettings, version: int | None, workers: int, progress: bool) -> EmbedReport:
    """The ``workers`` parts in as many processes (spawned, with these very settings), each running what an
    Indexed Job's pod runs for its part."""
    photos, todo = asyncio.run(plan(settings, version))
    if not todo:
        return EmbedReport(photos, 0, workers=workers)
    asyncio.run(ensure_extractor(settings))  # built once here, not by every part
    threads = max(1, (os.cpu_count() or 1) // workers)
    part_settings = settings.model_copy(update={"embed_threads": threads})
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = [pool.submit(_part, part_settings, version, i, workers, progress and i == 0) for i in range(workers)]
        errors = [part.exception() for part in parts]
    failed = [i for i, error in enumerate(errors) if error is not None]
    if failed:
        raise EmbedError(
            f"embedding parts {failed} of {workers} failed ({errors[failed[0]]!r}); rerun to compute what is missing"
        )
    reports = [part.result() for part in parts]
    return EmbedReport(
        photos,
        len(todo),
        computed=sum(r.computed for r in reports),
        failed=sum(r.failed for r in reports),
        workers=workers,
    )


def _part(settings: TrainerSettings, version: int | None, shard: int, shards: int, progress: bool) -> EmbedReport:
    return asyncio.run(_embed_part(settings, version, shard, shards, progress))


async def ensure_extractor(settings: TrainerSettings) -> bytes:
    """The extractor's flatbuffer from the store, built (with TensorFlow) and stored the first time."""
    spec = spec_of(settings)
    async with open_store(settings.store) as store:
        cached = await embeddings.cached_extractor(store, spec)
        if cached is not None:
            return cached
        from shared.quiet import filtered_stderr, import_tensorflow

        import_tensorflow()
        with filtered_stderr():
            flatbuffer = await asyncio.to_thread(build_flatbuffer, spec, settings.backbone_weights)
        await store.put(embeddings.extractor_key(spec), flatbuffer)
        return flatbuffer


async def _embed_part(
    settings: TrainerSettings, version: int | None, shard: int | None, shards: int, progress: bool
) -> EmbedReport:
    photos, todo = await plan(settings, version)
    if shard is not None:
        todo = [t for t in todo if shard_of(t.sha256, shards) == shard]
    report = EmbedReport(photos, len(todo), shard=shard, shards=shards)
    if not todo:
        return report
    spec = spec_of(settings)
    flatbuffer = await ensure_extractor(settings)
    from shared.quiet import filtered_stderr

    with filtered_stderr():
        extractor = Extractor(flatbuffer, settings.embed_threads or os.cpu_count() or 1)
    bar = tqdm(total=len(todo), desc="embed", unit="img", disable=not progress, file=sys.stderr)
    try:
        async with open_store(settings.store) as store, open_database(settings.database) as sessions:
            for start in range(0, len(todo), settings.embed_shard_photos):
                chunk = todo[start : start + settings.embed_shard_photos]
                datas = await _fetch_all(store, [t.object_key for t in chunk])
                computed = await asyncio.to_thread(_compute, extractor, chunk, datas, report, bar)
                if computed.sha256:
                    report.computed += await embeddings.write_shard(store, sessions, spec, computed)
    finally:
        bar.close()
    return report


async def _fetch_all(store, keys: list[str], concurrency: int = 16) -> list[bytes]:
    limit = asyncio.Semaphore(concurrency)

    async def one(key: str) -> bytes:
        async with limit:
            return await store.get(key)

    return await asyncio.gather(*(one(key) for key in keys))


def _compute(
    extractor: Extractor, chunk: list[Todo], datas: list[bytes], report: EmbedReport, bar
) -> embeddings.Computed:
    """The chunk's missing views; images decode in a thread a few photos ahead of the extractor."""
    shas, views, vectors = [], [], []
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        for todo, arrays in zip(chunk, _ahead(pool, chunk, datas), strict=True):
            bar.update()
            if arrays is None:
                report.failed += 1
                continue
            for view in todo.views:
                shas.append(todo.sha256)
                views.append(view)
                vectors.append(extractor(arrays[view]).astype(np.float16))
    matrix = np.stack(vectors) if vectors else np.zeros((0, embeddings.FEATURES), np.float16)
    return embeddings.Computed(shas, views, matrix)


def _ahead(pool: ThreadPoolExecutor, chunk: list[Todo], datas: list[bytes]) -> Iterator[dict[str, np.ndarray] | None]:
    """The view arrays of each photo, in order, prepared at most :data:`LOOKAHEAD` photos ahead."""
    window: collections.deque[Future] = collections.deque()
    items = iter(zip(chunk, datas, strict=True))

    def prepare(todo: Todo, data: bytes) -> dict[str, np.ndarray] | None:
        try:
            return view_arrays(data, small="small" in todo.views)
        except ImageError:  # ingest validated it: only a changed object could fail here
            return None

    for todo, data in items:
        window.append(pool.submit(prepare, todo, data))
        if len(window) >= LOOKAHEAD:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()
