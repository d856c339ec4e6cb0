from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from asgi_lifespan import LifespanManager

from services.api.app import create_app
from services.api.settings import ApiSettings
from shared.settings import DatabaseSettings, RegistrySettings
from tests.api.fakes import FakeSource
from tests.api.process import api_process
from tests.conftest import ARTIFACTS, api_env, mysql_url_of


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def api_settings(tmp_path) -> ApiSettings:
    return ApiSettings(
        prediction_log=True,
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path}/api.db"),
        poll_interval_s=0.05,
        retry_initial_s=0.05,
        retry_max_s=0.1,
        max_files=4,
        max_upload_bytes=2_000_000,
        max_body_bytes=8_000_000,
        max_instances=8,
    )


async def eventually(condition, timeout_s: float = 10.0, interval_s: float = 0.01) -> None:
    """Wait, on the event loop, until ``condition()`` is true; TimeoutError after ``timeout_s``."""
    import asyncio

    for _ in range(int(timeout_s / interval_s)):
        if condition():
            return
        await asyncio.sleep(interval_s)
    raise TimeoutError("condition not met")


async def wait_ready(client: httpx.AsyncClient, timeout: float = 5.0) -> None:
    import asyncio

    for _ in range(int(timeout / 0.02)):
        if (await client.get("/health/ready")).status_code == 200:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the app did not become ready")


@pytest.fixture
async def client(api_settings: ApiSettings, source: FakeSource) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(api_settings, source=source)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            await wait_ready(c)
            yield c


@pytest.fixture(scope="session")
def champion_registry(real_champion) -> RegistrySettings:
    """The registry holding the model trained on the real photos (see ``real_champion``)."""
    settings, _ = real_champion
    return settings.registry


@pytest.fixture(scope="session")
def api(champion_registry: RegistrySettings, databases) -> Iterator[str]:
    """One real API process serving the real champion, shared by the modules that need one; its prediction
    log goes to a MariaDB database of its own."""
    env = api_env(champion_registry, API_POLL_INTERVAL_S="1", DATABASE_URL=mysql_url_of(databases.create()))
    with api_process(env, ARTIFACTS / "api.log") as url:
        yield url
