"""The embedding store and the shard runner on real MariaDB + S3: computed once per image, split into parts that
give exactly the same bits, resumed after a kill without recomputing, and incremental when photos are added."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from services.trainer import embeddings, shards
from services.trainer.extractor import TRAINING_VIEWS, EmbeddingSpec
from services.trainer.features import build_features, load_feature_set
from services.trainer.ingest import ingest
from services.trainer.settings import TrainerSettings
from shared.db import open_database
from shared.settings import DatabaseSettings, ObjectStoreSettings
from shared.storage import open_store
from shared.tables import EmbeddingRow, EmbeddingShardRow
from tests.conftest import AWS_ENV, mysql_url_of, settings_env
from tests.crafted import write_crafted_folder

pytestmark = pytest.mark.slow  # builds the LiteRT extractor (TensorFlow) once per bucket

FAST = {"resolution": 96, "embed_shard_photos": 4, "embed_threads": 1}


def prepared(settings: TrainerSettings, folder: Path) -> TrainerSettings:
    settings = settings.model_copy(update={**FAST, "data_source": str(folder)})
    asyncio.run(ingest(settings, progress=False))
    asyncio.run(build_features(settings, progress=False))
    return settings


def matrix(settings: TrainerSettings) -> tuple[list[str], np.ndarray, np.ndarray]:
    async def read():
        _, table = await load_feature_set(settings)
        hashes = sorted(table["sha256"].to_pylist())
        async with open_store(settings.store) as store, open_database(settings.database) as sessions:
            found = await embeddings.load(store, sessions, shards.spec_of(settings), hashes, (*TRAINING_VIEWS, "small"))
        return hashes, *found

    return asyncio.run(read())


async def rows_and_shards(settings: TrainerSettings) -> tuple[int, int, int]:
    async with open_database(settings.database) as sessions, sessions() as session:
        rows = await session.scalar(select(func.count()).select_from(EmbeddingRow))
        distinct = await session.scalar(
            select(func.count()).select_from(select(EmbeddingRow.sha256, EmbeddingRow.view).distinct().subquery())
        )
        files = await session.scalar(select(func.count()).select_from(EmbeddingShardRow))
    return rows, distinct, files


@pytest.fixture
def other_stack(databases, s3_endpoint) -> TrainerSettings:
    """A second, empty database and bucket."""
    return TrainerSettings(
        store=ObjectStoreSettings(
            url=f"s3://other-{uuid.uuid4().hex[:10]}/data",
            endpoint_url=s3_endpoint,
            access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        ),
        database=DatabaseSettings(url=mysql_url_of(databases.create())),
    )


def test_two_parts_in_two_processes_equal_one_process(
    stack_settings: TrainerSettings, other_stack: TrainerSettings, tmp_path: Path
) -> None:
    folder = write_crafted_folder(tmp_path / "photos", per_class=10, refused={"daisy": 4})
    split = prepared(stack_settings, folder)
    whole = prepared(other_stack, folder)
    report = shards.embed(split, workers=2, progress=False)
    assert (report.photos, report.todo, report.workers) == (24, 24, 2)
    assert report.computed == 24 * 3  # full, mirror and small: every photo is in the evaluation sample here
    assert shards.embed(whole, workers=1, progress=False).computed == 24 * 3
    hashes_a, a, found_a = matrix(split)
    hashes_b, b, found_b = matrix(whole)
    assert hashes_a == hashes_b and found_a.all() and found_b.all()
    np.testing.assert_array_equal(a, b)  # the same bits, however the work was split
    assert a.dtype == np.float16 and a.shape == (3, 24, embeddings.FEATURES) and np.abs(a).max() > 0
    rows, distinct, files = asyncio.run(rows_and_shards(split))
    assert rows == distinct == 72 and files >= 2 * 3  # 4 photos a file, in each of two parts

    again = shards.embed(split, workers=2, progress=False)
    assert again.todo == 0 and "already have their embeddings" in again.summary()


def test_a_killed_part_resumes_and_nothing_is_computed_twice(stack_settings: TrainerSettings, tmp_path: Path) -> None:
    folder = write_crafted_folder(tmp_path / "photos", per_class=30)
    settings = prepared(stack_settings, folder).model_copy(update={"embed_shard_photos": 1})
    asyncio.run(shards.ensure_extractor(settings))  # so that the part starts computing at once
    env = {
        **os.environ,
        **settings_env(settings),
        **AWS_ENV,
        "TRAINER_RESOLUTION": "96",
        "TRAINER_EMBED_SHARD_PHOTOS": "1",
        "TRAINER_EMBED_THREADS": "1",
    }
    part = subprocess.Popen(
        [sys.executable, "-m", "services.trainer", "embed", "--quiet", "--shards", "1", "--shard", "0"], env=env
    )
    deadline = time.monotonic() + 120
    while asyncio.run(rows_and_shards(settings))[2] < 5:
        assert part.poll() is None, "the part ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    part.send_signal(signal.SIGKILL)
    part.wait()
    before, _, _ = asyncio.run(rows_and_shards(settings))
    assert 0 < before < 60 * 3, "killed mid-way"

    resumed = shards.embed(settings, workers=1, progress=False)
    after, distinct, _ = asyncio.run(rows_and_shards(settings))
    assert resumed.computed == 60 * 3 - before, "only what was missing"
    assert after == distinct == 60 * 3, "every view of every photo exactly once"
    _, _, found = matrix(settings)
    assert found.all()


def test_a_retrain_embeds_only_the_new_photos(stack_settings: TrainerSettings, tmp_path: Path) -> None:
    folder = write_crafted_folder(tmp_path / "photos", per_class=8)
    settings = prepared(stack_settings, folder)
    assert shards.embed(settings, workers=1, progress=False).todo == 16
    write_crafted_folder(tmp_path / "more", per_class=2, offset=900)
    asyncio.run(ingest(settings, str(tmp_path / "more"), progress=False))
    asyncio.run(build_features(settings, progress=False))
    report = shards.embed(settings, workers=1, progress=False)
    assert (report.photos, report.todo, report.computed) == (20, 4, 12)


def test_the_store_skips_what_is_known_and_ignores_files_never_recorded(stack_settings: TrainerSettings) -> None:
    spec = EmbeddingSpec("lite0", 96, "0" * 64)
    vectors = np.arange(2 * embeddings.FEATURES, dtype=np.float16).reshape(2, -1)
    computed = embeddings.Computed(["a" * 64, "b" * 64], ["full", "full"], vectors)

    async def scenario():
        async with open_store(stack_settings.store) as store, open_database(stack_settings.database) as sessions:
            assert await embeddings.write_shard(store, sessions, spec, computed) == 2
            assert await embeddings.write_shard(store, sessions, spec, computed) == 0  # another process was first
            # A file whose rows never committed (a part killed between the two) holds other values: never read.
            orphan = embeddings.Computed(["a" * 64], ["full"], np.full((1, embeddings.FEATURES), 7, np.float16))
            await store.put(f"{embeddings.prefix(spec)}/orphan.parquet", _parquet(orphan))
            return await embeddings.load(store, sessions, spec, ["a" * 64, "b" * 64, "c" * 64], ("full", "small"))

    loaded, found = asyncio.run(scenario())
    np.testing.assert_array_equal(loaded[0, :2], vectors)
    assert found.tolist() == [[True, True, False], [False, False, False]]


def _parquet(computed: embeddings.Computed) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "sha256": computed.sha256,
            "view": computed.view,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(computed.vectors.reshape(-1)), embeddings.FEATURES),
        },
        schema=embeddings.SCHEMA,
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_the_part_comes_from_the_indexed_job(stack_settings: TrainerSettings, tmp_path: Path, monkeypatch) -> None:
    """In Kubernetes each pod of an Indexed Job gets JOB_COMPLETION_INDEX: `embed --shards 2` computes that part."""
    from services.trainer.cli import main

    folder = write_crafted_folder(tmp_path / "photos", per_class=6)
    settings = prepared(stack_settings, folder)
    for name, value in {**settings_env(settings), "TRAINER_RESOLUTION": "96", "JOB_COMPLETION_INDEX": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["embed", "--quiet", "--shards", "2"]) == 0
    _, todo = asyncio.run(shards.plan(settings))
    left = {shards.shard_of(t.sha256, 2) for t in todo}
    assert left == {0}, "part 1 is done, part 0 is not"
    assert main(["embed", "--quiet", "--shards", "2", "--shard", "2"]) == 1  # not one of the parts
