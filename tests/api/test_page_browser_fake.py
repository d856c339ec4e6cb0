"""The upload page in headless Chromium against the real app on uvicorn with the fake model (tests/api/fakes.py),
for what the trained model on the real photos cannot be made to answer on demand: a kind of photo it was taught to
refuse, and an activation map whose cells are known. The feedback lands in a real (SQLite) prediction log.

The real model's page tests are in ``test_page_browser.py`` (same browser, same helpers).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page

from services.api.app import create_app
from services.api.settings import ApiSettings
from shared.db import open_database
from shared.tables import FeedbackRow, PredictionRow
from tests.api.fakes import FakeSource
from tests.api.process import app_in_thread
from tests.api.test_page_browser import (
    ARTIFACTS,
    CLASSES,
    WAIT_MS,
    Recorded,
    browser,  # noqa: F401  (the module's fixture)
    cards,
    check_traffic,
    open_page,
    settle,
)
from tests.api.test_prediction_log import metric

pytestmark = pytest.mark.slow

NEUTRAL = "rgb(123, 135, 148)"  # style.css --neutral: a flagged card's accent
GRASS_GREEN = "rgb(59, 148, 65)"  # --green-600


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, ApiSettings]]:
    folder = tmp_path_factory.mktemp("fake-api")
    settings = ApiSettings(
        prediction_log=True,
        database={"url": f"sqlite+aiosqlite:///{folder}/api.db"},
        prediction_log_flush_interval_s=0.05,
        live_accuracy_refresh_s=0.1,
        poll_interval_s=0.5,
    )
    source = FakeSource()
    source.domain_threshold, source.neither_threshold, source.explains = 0.3, 0.5, True
    with app_in_thread(create_app(settings, source=source)) as url:
        yield url, settings


@pytest.fixture
def api(served) -> str:
    return served[0]


def photo(path: Path, *halves: tuple[int, int, int], size: tuple[int, int] = (300, 200)) -> Path:
    """A PNG of vertical bands of the given colours (left to right)."""
    image = Image.new("RGB", size)
    width = size[0] // len(halves)
    for i, colour in enumerate(halves):
        image.paste(colour, (i * width, 0, size[0] if i == len(halves) - 1 else (i + 1) * width, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


YELLOW, GREEN, RED, WHITE = (250, 220, 20), (40, 150, 30), (230, 40, 80), (255, 255, 255)


@pytest.fixture
def page(browser: Browser, api: str) -> Iterator[Page]:  # noqa: F811
    recorded = Recorded()
    page = open_page(browser, api, recorded)
    yield page
    page.close()
    check_traffic(api, recorded)


def accent(page: Page) -> str:
    return page.eval_on_selector("#results .card", "c => getComputedStyle(c).borderLeftColor")


def wait_feedback(page: Page) -> None:
    page.wait_for_function("() => document.querySelector('#results .card .feedback').dataset.status", timeout=WAIT_MS)


def logged(settings: ApiSettings, prediction_id: str) -> tuple[PredictionRow | None, FeedbackRow | None]:
    """The prediction log's row for ``prediction_id`` and its feedback row, read from the database."""

    async def read() -> tuple[PredictionRow | None, FeedbackRow | None]:
        async with open_database(settings.database) as sessions, sessions() as session:
            return await session.get(PredictionRow, prediction_id), await session.get(FeedbackRow, prediction_id)

    # Playwright's sync API keeps an event loop running on this thread: read from another one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, read()).result()


def test_another_flower_is_named_and_answered_neither(page: Page, served, tmp_path: Path) -> None:
    api, settings = served
    with page.expect_response(lambda r: "/predict" in r.url) as answer:
        page.set_input_files("#file", str(photo(tmp_path / "rose.png", RED)))
    settle(page, 1)
    body = answer.value.json()
    assert body["out_of_domain_reason"] == "looks_like_refused_kind"
    (card,) = cards(page)
    assert card["verdict"] == "This looks like another flower, not a dandelion"
    assert card["spoken"].startswith(card["verdict"] + "; the model would say ")
    assert [b["cls"] for b in card["bars"]] == CLASSES
    # The accent gives nothing away: neither the answered class's colour nor grass green.
    assert accent(page) == NEUTRAL
    feedback = page.locator("#results .card .feedback")
    assert feedback.locator(".feedback-question").inner_text() == "Is it dandelion, grass, or neither?"
    assert [b.inner_text() for b in feedback.locator("button").all()] == ["Dandelion", "Grass", "Neither"]
    page.screenshot(path=ARTIFACTS / "upload-page-refused-kind.png", full_page=True)
    page.get_by_role("button", name="Neither").click()
    wait_feedback(page)
    assert feedback.inner_text() == "Thanks: recorded as neither."

    prediction, told = logged(settings, body["id"])
    assert prediction is not None and prediction.in_domain is False and prediction.label == body["label"]
    assert told is not None and told.label == "neither"
    text = httpx.get(f"{api}/metrics", timeout=10).text
    assert metric(text, "model_feedback_total", outcome="neither", version="1") >= 1
    assert metric(text, "model_domain_feedback_total", outcome="confirmed_out_of_domain", version="1") >= 1


def test_an_answer_in_domain_also_offers_neither(page: Page, served, tmp_path: Path) -> None:
    api, settings = served
    with page.expect_response(lambda r: "/predict" in r.url) as answer:
        page.set_input_files("#file", str(photo(tmp_path / "yellow.png", YELLOW)))
    settle(page, 1)
    body = answer.value.json()
    assert body["in_domain"] is True and body["label"] == "dandelion"
    feedback = page.locator("#results .card .feedback")
    assert feedback.locator(".feedback-question").inner_text() == "Right?"
    assert [b.inner_text() for b in feedback.locator("button").all()] == ["Yes", "No, it is grass", "Neither"]
    assert accent(page) != NEUTRAL
    page.get_by_role("button", name="Neither").click()
    wait_feedback(page)
    prediction, told = logged(settings, body["id"])
    assert (prediction.in_domain, told.label) == (True, "neither")
    text = httpx.get(f"{api}/metrics", timeout=10).text
    assert metric(text, "model_domain_feedback_total", outcome="missed_out_of_domain", version="1") >= 1


def test_why_lays_the_activation_map_over_the_thumbnail_on_demand(page: Page, tmp_path: Path) -> None:
    # The left third dandelion yellow, the rest grass green: the map argues for dandelion on the left only.
    with page.expect_response(lambda r: "/predict" in r.url) as answer:
        page.set_input_files("#file", str(photo(tmp_path / "thirds.png", YELLOW, GREEN, GREEN, size=(300, 300))))
    settle(page, 1)
    assert answer.value.url.endswith("/predict?explain=true")
    explain = answer.value.json()["explain"]
    overlay, why = page.locator("#results .card .heatmap"), page.locator("#results .card .why")
    assert why.is_visible() and why.get_attribute("aria-pressed") == "false"
    assert not overlay.is_visible(), "the map is shown only when asked"
    before = page.locator("#results .card .thumb-box").screenshot()

    why.click()
    assert why.get_attribute("aria-pressed") == "true" and why.inner_text() == "Hide why"
    assert overlay.is_visible()
    assert overlay.get_attribute("src") == explain["png"]  # the answer's own map
    # Decoded (the page's CSP lets the data: PNG in) at its grid size, laid over the whole visible thumbnail.
    assert page.eval_on_selector("#results .card .heatmap", "i => [i.naturalWidth, i.naturalHeight]") == [3, 3]
    box, thumb = overlay.bounding_box(), page.locator("#results .card .thumb-box").bounding_box()
    assert box["x"] <= thumb["x"] + 0.5 and box["x"] + box["width"] >= thumb["x"] + thumb["width"] - 0.5
    assert box["y"] <= thumb["y"] + 0.5 and box["y"] + box["height"] >= thumb["y"] + thumb["height"] - 0.5
    after = page.locator("#results .card .thumb-box").screenshot()
    assert after != before
    with Image.open(io.BytesIO(before)) as b, Image.open(io.BytesIO(after)) as a:
        width, height = a.size
        left, right = (width // 6, height // 2), (width * 5 // 6, height // 2)
        # Orange over the yellow third (the evidence), the green as it was.
        assert a.convert("RGB").getpixel(left) != b.convert("RGB").getpixel(left)
        assert a.convert("RGB").getpixel(right) == b.convert("RGB").getpixel(right)
    page.screenshot(path=ARTIFACTS / "upload-page-why.png", full_page=True)

    why.click()
    assert why.get_attribute("aria-pressed") == "false" and not overlay.is_visible()


def test_a_flagged_answer_has_its_why_too(page: Page, tmp_path: Path) -> None:
    page.set_input_files("#file", str(photo(tmp_path / "white.png", WHITE)))
    settle(page, 1)
    assert page.eval_on_selector("#results .card", "c => c.dataset.outside") == "true"
    page.locator("#results .card .why").click()
    assert page.locator("#results .card .heatmap").is_visible()
