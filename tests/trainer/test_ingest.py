"""Ingest into real MariaDB + S3 (moto_server): from the shared folder, over HTTP, idempotent, and failing clearly."""

from __future__ import annotations

import asyncio
import functools
import http.server
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from services.trainer import ingest as ingest_module
from services.trainer.cli import main
from services.trainer.ingest import SourceError, ingest
from services.trainer.settings import TrainerSettings
from shared import descriptors
from shared.db import DatabaseError, open_database
from shared.settings import DatabaseSettings
from shared.storage import ObjectStoreError, open_store
from shared.tables import ImageRow
from tests.servers import TcpProxy, free_port

CORRUPT_INDEX = ("dandelion", "00000002.jpg")  # an index the mirror does not have


async def table_and_bucket(settings: TrainerSettings) -> tuple[list[ImageRow], list[str]]:
    async with open_database(settings.database) as sessions, sessions() as session:
        rows = list((await session.scalars(select(ImageRow))).all())
    async with open_store(settings.store) as store:
        keys = await store.list("raw/")
    return rows, keys


def test_folder_ingest_twice(stack_settings: TrainerSettings, data_dir: Path, monkeypatch) -> None:
    first = asyncio.run(ingest(stack_settings, str(data_dir), progress=False))
    assert (first.new, first.duplicate, first.failed, sum(first.rejected.values())) == (320, 0, 0, 0)
    assert first.new_by_label == {"dandelion": 160, "grass": 160}

    rows, keys = asyncio.run(table_and_bucket(stack_settings))
    assert len(rows) == 320 and len(keys) == 320
    assert {r.object_key for r in rows} == set(keys)
    for row in rows:
        assert row.object_key == f"raw/{row.label}/{row.sha256}.jpg"
        assert row.width > 0 and row.height > 0 and row.byte_size > 0
        assert Path(row.source).parent.name == row.label

    decoded = []
    monkeypatch.setattr(ingest_module, "load", lambda data: decoded.append(data) or descriptors.load(data))
    second = asyncio.run(ingest(stack_settings, str(data_dir), progress=False))
    assert (second.new, second.duplicate) == (0, 320)
    assert "0 new, 320 already stored" in second.summary()
    assert decoded == []  # a stored photo is known by its hash: a rerun on a big folder does not decode it again
    rows, keys = asyncio.run(table_and_bucket(stack_settings))
    assert len(rows) == 320 and len(keys) == 320


def test_object_bytes_are_the_source_bytes(stack_settings: TrainerSettings, data_dir: Path) -> None:
    asyncio.run(ingest(stack_settings, str(data_dir), per_class=3, progress=False))
    rows, _ = asyncio.run(table_and_bucket(stack_settings))

    async def fetch(key: str) -> bytes:
        async with open_store(stack_settings.store) as store:
            return await store.get(key)

    for row in rows:
        assert asyncio.run(fetch(row.object_key)) == Path(row.source).read_bytes()


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """Serves the shared folder as ``/data/{label}/{i:08d}.jpg``; one corrupt file, one flaky file."""

    root: Path
    flaky: dict[str, int]
    gets: int = 0

    def do_GET(self) -> None:
        MirrorHandler.gets += 1
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "data":
            self.send_error(404)
            return
        label, name = parts[1], parts[2]
        if (label, name) == CORRUPT_INDEX:
            body = b"\xff\xd8\xff\xe0 this is not really a jpeg"
        elif self.flaky.get(name, 0) > 0:
            self.flaky[name] -= 1
            self.send_error(503)
            return
        else:
            path = self.root / label / name
            if not path.is_file():
                self.send_error(404)
                return
            body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(data_dir: Path) -> Iterator[str]:
    handler = functools.partial(MirrorHandler)
    MirrorHandler.root = data_dir
    MirrorHandler.flaky = {"00000001.jpg": 2}  # fails twice, then serves: retries must get it
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/data"
    server.shutdown()
    server.server_close()


def test_http_ingest_with_missing_indices_a_corrupt_file_and_retries(
    stack_settings: TrainerSettings, mirror: str, data_dir: Path
) -> None:
    report = asyncio.run(ingest(stack_settings, mirror, per_class=200, progress=False))
    print(f"\nHTTP ingest into MariaDB + S3: {report.summary()}")
    on_disk = sum(1 for _ in data_dir.glob("*/*.jpg"))
    assert report.new == on_disk == 320
    assert report.rejected == {"not_an_image": 1}
    assert report.missing == 400 - 320 - 1
    assert report.failed == 0
    rows, keys = asyncio.run(table_and_bucket(stack_settings))
    assert len(rows) == len(keys) == 320
    assert all(r.source.startswith(mirror) for r in rows)

    MirrorHandler.gets = 0
    again = asyncio.run(ingest(stack_settings, mirror, per_class=200, progress=False))
    assert (again.new, again.duplicate) == (0, 320)
    assert MirrorHandler.gets == 400 - 320  # only what is not ingested yet (missing, corrupt) is asked for again


def test_unreachable_source_fails_with_one_line(stack_settings: TrainerSettings, capsys) -> None:
    dead = f"http://127.0.0.1:{free_port()}/data"
    with pytest.raises(SourceError, match="unreachable") as raised:
        asyncio.run(ingest(stack_settings, dead, per_class=5, progress=False))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"source {dead} is unreachable"), message
    assert "--source" in message and "Traceback" not in message  # and what to do instead
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", ""), "nothing but the one line: no per-file noise"


def test_cli_exit_codes(stack_settings: TrainerSettings, monkeypatch, capsys, tmp_path: Path, data_dir: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", stack_settings.database.url.get_secret_value())
    monkeypatch.setenv("OBJECT_STORE_URL", stack_settings.store.url)
    monkeypatch.setenv("S3_ENDPOINT_URL", stack_settings.store.endpoint_url or "")

    assert main(["ingest", "--quiet", "--source", f"http://127.0.0.1:{free_port()}/x", "--per-class", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: source") and "unreachable" in err[0]

    (tmp_path / "empty" / "grass").mkdir(parents=True)
    assert main(["ingest", "--quiet", "--source", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "has no photos under dandelion/ or grass/" in err and "subfolder" in err

    assert main(["ingest", "--quiet", "--source", str(data_dir), "--per-class", "2"]) == 0
    assert "4 new" in capsys.readouterr().out


def test_rows_only_for_objects(stack_settings: TrainerSettings, data_dir: Path) -> None:
    asyncio.run(ingest(stack_settings, str(data_dir), per_class=10, progress=False))

    async def counts() -> tuple[int, int]:
        async with open_database(stack_settings.database) as sessions, sessions() as session:
            n_rows = await session.scalar(select(func.count()).select_from(ImageRow))
        async with open_store(stack_settings.store) as store:
            return n_rows, len(await store.list("raw/"))

    assert asyncio.run(counts()) == (20, 20)


class _FailingPut:
    """The real store, whose ``fail_at``-th put fails after ``delay_s``: long enough for a row written before
    its object to be committed (rows are written at once here: TRAINER_INGEST_BATCH_ROWS=1)."""

    def __init__(self, store, fail_at: int, delay_s: float) -> None:
        self.store, self.fail_at, self.delay_s = store, fail_at, delay_s
        self.puts = 0
        self.failed_key: str | None = None

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    async def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.puts += 1
        if self.puts == self.fail_at:
            self.failed_key = key
            await asyncio.sleep(self.delay_s)
            raise ObjectStoreError(f"injected: storing {key} failed")
        await self.store.put(key, data, content_type=content_type)


def test_no_row_for_an_object_that_failed_to_store(
    stack_settings: TrainerSettings, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store fails on one object mid-run: the run fails, and no row names that object (a row is written
    only after its object is stored)."""
    import contextlib

    import services.trainer.ingest as ingest_module

    failing: list[_FailingPut] = []

    @contextlib.asynccontextmanager
    async def store_failing_once(settings, **kwargs):
        async with open_store(settings, **kwargs) as store:
            failing.append(_FailingPut(store, fail_at=5, delay_s=1.0))
            yield failing[-1]

    monkeypatch.setattr(ingest_module, "open_store", store_failing_once)
    settings = stack_settings.model_copy(update={"ingest_batch_rows": 1, "download_concurrency": 2})
    with pytest.raises(ObjectStoreError, match="injected"):
        asyncio.run(ingest(settings, str(data_dir), per_class=10, progress=False))
    (store,) = failing
    assert store.failed_key is not None
    rows, keys = asyncio.run(table_and_bucket(stack_settings))
    assert store.failed_key not in {r.object_key for r in rows}, "a row for an object that was never stored"
    assert {r.object_key for r in rows} <= set(keys), "a row without its object"
    assert store.failed_key not in keys


def _proxied(settings: TrainerSettings, s3: TcpProxy | None = None, db: TcpProxy | None = None) -> TrainerSettings:
    update = {}
    if s3 is not None:
        update["store"] = settings.store.model_copy(update={"endpoint_url": f"http://127.0.0.1:{s3.port}"})
    if db is not None:
        url = settings.database.url.get_secret_value().replace(":3306/", f":{db.port}/")
        update["database"] = DatabaseSettings(url=url)
    return settings.model_copy(update=update)


async def _consistent(settings: TrainerSettings) -> tuple[int, int]:
    """(rows, objects); every row's object exists."""
    async with open_database(settings.database) as sessions, sessions() as session:
        rows = list((await session.scalars(select(ImageRow))).all())
    async with open_store(settings.store) as store:
        keys = set(await store.list("raw/"))
    assert {r.object_key for r in rows} <= keys, "a row without its object"
    assert len({r.sha256 for r in rows}) == len(rows)
    return len(rows), len(keys)


@pytest.mark.parametrize("which", ["s3", "database"])
def test_outage_mid_ingest_then_rerun_completes(stack_settings: TrainerSettings, data_dir: Path, which: str) -> None:
    s3_host, s3_port = stack_settings.store.endpoint_url.removeprefix("http://").split(":")
    s3 = TcpProxy(s3_host, int(s3_port)).start()
    db = TcpProxy("127.0.0.1", 3306).start()
    settings = _proxied(stack_settings, s3=s3, db=db)
    settings = settings.model_copy(update={"download_concurrency": 4, "ingest_batch_rows": 16})
    broken = s3 if which == "s3" else db

    stored = 0

    def outage_after_some(row: ImageRow) -> None:
        nonlocal stored
        stored += 1
        if stored == 40:
            broken.stop()

    expected = (ObjectStoreError,) if which == "s3" else (DatabaseError,)
    try:
        with pytest.raises(expected):
            asyncio.run(ingest(settings, str(data_dir), progress=False, on_stored=outage_after_some))
    finally:
        s3.stop()
        db.stop()
    rows, _ = asyncio.run(_consistent(stack_settings))
    assert 40 <= rows < 320

    rerun = asyncio.run(ingest(stack_settings, str(data_dir), progress=False))
    assert rerun.new == 320 - rows
    assert asyncio.run(_consistent(stack_settings)) == (320, 320)


def test_cli_says_which_dependency_is_down(stack_settings: TrainerSettings, monkeypatch, capsys, data_dir) -> None:
    monkeypatch.setenv("DATABASE_URL", f"mysql+asyncmy://root@127.0.0.1:{free_port()}/nothing")
    monkeypatch.setenv("OBJECT_STORE_URL", stack_settings.store.url)
    monkeypatch.setenv("S3_ENDPOINT_URL", stack_settings.store.endpoint_url or "")
    assert main(["ingest", "--quiet", "--source", str(data_dir), "--per-class", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the database is unavailable")


def test_ingest_refuses_what_the_api_refuses(stack_settings: TrainerSettings, tmp_path: Path, data_dir: Path) -> None:
    """The same decoder and the same caps as the API: an EPS named .jpg is never handed to Ghostscript, a float
    TIFF over the decode budget is refused before decoding, a PPM is not an accepted format."""
    import io

    import numpy as np
    from PIL import Image

    from tests.shared.test_images import other_format

    folder = tmp_path / "source"
    (folder / "dandelion").mkdir(parents=True)
    (folder / "grass").mkdir()
    (folder / "dandelion" / "a.jpg").write_bytes((data_dir / "dandelion" / "00000000.jpg").read_bytes())
    (folder / "dandelion" / "loop.jpg").write_bytes(other_format("EPS"))
    (folder / "grass" / "p.png").write_bytes(other_format("PPM"))
    big = io.BytesIO()
    Image.fromarray(np.zeros((6300, 6300), np.float32), "F").save(big, "TIFF", compression="tiff_adobe_deflate")
    (folder / "grass" / "float.tif").write_bytes(big.getvalue())
    report = asyncio.run(ingest(stack_settings, str(folder), progress=False))
    assert report.new == 1
    assert report.rejected == {"unsupported_format": 2, "image_too_large": 1}


def test_a_folder_gives_all_its_photos_and_a_limit_says_what_it_left_out(
    stack_settings: TrainerSettings, tmp_path: Path
) -> None:
    """TRAINER_PER_CLASS (200) counts HTTP indices only: a folder of 210 photos a class is ingested whole (it was
    silently cut to 200); an explicit --per-class limits it, and the summary says by how much."""
    from tests.crafted import write_crafted_folder

    folder = write_crafted_folder(tmp_path / "many", per_class=210)
    limited = asyncio.run(ingest(stack_settings, str(folder), per_class=200, progress=False))
    assert limited.new == 400
    assert "10 dandelion photos left out by the limit of 200" in limited.summary()
    everything = asyncio.run(ingest(stack_settings, str(folder), progress=False))
    assert (everything.new, everything.duplicate) == (20, 400) and "note" not in everything.summary()


def test_a_limit_counts_each_kind_of_neither_on_its_own(stack_settings: TrainerSettings, tmp_path: Path) -> None:
    """--per-class 2 on a folder with daisy/ and rose/: two of each (the limit once took both from daisy/, the
    first by name, and left the model without a single rose)."""
    from tests.crafted import write_crafted_folder

    folder = write_crafted_folder(tmp_path / "garden", per_class=3, refused={"daisy": 3, "rose": 3})
    report = asyncio.run(ingest(stack_settings, str(folder), per_class=2, progress=False))
    rows, _ = asyncio.run(table_and_bucket(stack_settings))
    assert Counter(r.kind for r in rows) == {"dandelion": 2, "grass": 2, "daisy": 2, "rose": 2}
    assert "1 rose photos left out by the limit of 2 per subfolder" in report.summary()


def test_several_sources_are_named_and_recorded(stack_settings: TrainerSettings, tmp_path: Path, mirror) -> None:
    from tests.crafted import write_crafted_folder

    folder = write_crafted_folder(tmp_path / "garden", per_class=3, refused={"tulip": 2})
    report = asyncio.run(ingest(stack_settings, [str(folder), f"upstream={mirror}"], per_class=2, progress=False))
    rows, _ = asyncio.run(table_and_bucket(stack_settings))
    by_origin = Counter((r.origin, r.label, r.kind) for r in rows)
    assert by_origin == {
        ("garden", "dandelion", "dandelion"): 2,
        ("garden", "grass", "grass"): 2,
        ("garden", "neither", "tulip"): 2,
        ("upstream", "dandelion", "dandelion"): 2,
        ("upstream", "grass", "grass"): 2,
    }
    assert all(r.rgb_r_mean is not None for r in rows), "described at ingest"
    summary = report.summary()
    assert "garden: 1 dandelion photos left out by the limit of 2" in summary
    assert "upstream: dandelion has a photo at the last index tried (1): there may be more" in summary


def test_embedded_ingest_of_a_large_folder_has_one_writer(tmp_path: Path) -> None:
    """SQLite, 16 readers: the rows go through one writer in batches (12,800 photos once failed with "database is
    locked" after ~5,000 rows)."""
    from services.trainer.settings import TrainerSettings as Settings
    from shared.settings import ObjectStoreSettings
    from tests.crafted import write_crafted_folder

    folder = write_crafted_folder(tmp_path / "photos", per_class=300)
    settings = Settings(
        store=ObjectStoreSettings(url=str(tmp_path / "objects")),
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path}/embedded.db"),
        download_concurrency=16,
        ingest_batch_rows=16,
    )
    report = asyncio.run(ingest(settings, str(folder), progress=False))
    assert (report.new, report.failed, sum(report.rejected.values())) == (600, 0, 0)
    rows, keys = asyncio.run(table_and_bucket(settings))
    assert len(rows) == len(keys) == 600
