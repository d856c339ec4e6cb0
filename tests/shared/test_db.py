"""Upgrading a database made by an earlier version: the columns added since are added, data kept."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr
from sqlalchemy import insert, select, text

from shared.db import create_engine, create_tables
from shared.descriptors import DESCRIPTOR_COLUMNS
from shared.settings import DatabaseSettings
from shared.tables import PredictionRow

ADDED_LATER = ("domain_distance", "in_domain")
"""Columns of ``predictions`` that databases created before the in-domain score lack."""


def row(prediction_id: str, **extra: object) -> dict[str, object]:
    return {
        "id": prediction_id,
        "created_at": datetime.now(UTC),
        "endpoint": "predict",
        "model_name": "m",
        "model_version": "1",
        "label": "grass",
        "confidence": 0.9,
        "latency_ms": 12.0,
        **{name: 0.5 for name in DESCRIPTOR_COLUMNS},
        **extra,
    }


async def upgrade(url: str) -> list[tuple]:
    engine = create_engine(DatabaseSettings(url=SecretStr(url)))
    try:
        await create_tables(engine)
        async with engine.begin() as conn:  # the table as an earlier version created it
            for column in ADDED_LATER:
                await conn.execute(text(f"ALTER TABLE predictions DROP COLUMN {column}"))
            await conn.execute(insert(PredictionRow.__table__), [row("old")])
        await create_tables(engine)  # what every process does at start
        await create_tables(engine)  # and again: nothing left to add
        async with engine.begin() as conn:
            await conn.execute(insert(PredictionRow.__table__), [row("new", domain_distance=0.42, in_domain=False)])
            result = await conn.execute(
                select(PredictionRow.id, PredictionRow.domain_distance, PredictionRow.in_domain).order_by(
                    PredictionRow.id
                )
            )
            return [tuple(r) for r in result]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"])
def test_columns_added_since_are_added_to_an_old_table(backend: str, tmp_path, databases) -> None:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    else:
        from tests.conftest import mysql_url_of

        url = mysql_url_of(databases.create())
    rows = asyncio.run(upgrade(url))
    assert [(r[0], r[1], None if r[2] is None else bool(r[2])) for r in rows] == [
        ("new", pytest.approx(0.42), False),
        ("old", None, None),
    ]
