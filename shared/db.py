"""Async engine and session factory for the metadata database (MySQL in the stack, SQLite embedded)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from shared.settings import DatabaseSettings
from shared.tables import Base


class DatabaseError(RuntimeError):
    """The metadata database could not be reached or refused a write."""


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (``sqlite:///var/x.db``, ``sqlite+aiosqlite:////abs/x.db``); None for
    any other database, and for an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


SQLITE_BUSY_TIMEOUT_S = 60
"""How long a SQLite writer waits for another (the trainer and the API share the embedded database)."""


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    url = settings.url.get_secret_value()
    if (database := sqlite_file(url)) is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, echo=settings.echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, echo=settings.echo, pool_pre_ping=True, pool_recycle=1800)


def _sqlite_pragmas(connection, _record) -> None:
    """Write-ahead logging: readers never wait for the writer, and one writer at a time waits its turn
    (``timeout``) instead of failing with "database is locked"."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


async def create_tables(engine: AsyncEngine, attempts: int = 3) -> None:
    """Create the tables that do not exist yet. Two processes may race to create the same table (the trainer
    and the API share the database); the loser's CREATE fails with "already exists", and it simply checks again.
    """
    for attempt in range(attempts):
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
                await conn.run_sync(_add_missing_columns)
            return
        except (OperationalError, ProgrammingError) as exc:
            if "already exists" not in str(exc) or attempt == attempts - 1:
                raise


def _add_missing_columns(conn) -> None:
    """Columns added to a table after it was created (all nullable), added to a database that lacks them.

    ``create_all`` makes missing tables only; a database created by an earlier version keeps its old tables.
    New columns are always nullable, so an ``ALTER TABLE ... ADD COLUMN`` is all an upgrade needs (the only
    migration this schema has needed; anything more would call for Alembic).
    """
    from sqlalchemy import inspect
    from sqlalchemy.schema import CreateColumn

    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise DatabaseError(f"table {table.name} lacks the required column {column.name}: migrate it by hand")
            definition = CreateColumn(column).compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {definition}")


@asynccontextmanager
async def open_database(settings: DatabaseSettings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """An engine with the tables created, as a session factory; disposed on exit."""
    engine = create_engine(settings)
    try:
        await create_tables(engine)
        yield async_sessionmaker(engine, expire_on_commit=False)
    except (OperationalError, InterfaceError, OSError) as exc:
        # Connection-level failures (server down, restarted, unreachable): one clear line for operators.
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
        raise DatabaseError(
            f"the database is unavailable ({make_url(settings.url.get_secret_value()).host or 'local'}): {detail}"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await engine.dispose()
