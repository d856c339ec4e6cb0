"""The upload page in headless Chromium against the real API process serving a model trained on the real photos.

Debian's ``chromium`` package driven by Playwright (``executable_path``; Playwright's own browser download is not
used). The test starts the API and the browser itself and stops both; screenshots go to the test artifacts.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError as exc:  # pragma: no cover - a clear message instead of a bare import error
    raise ImportError("the browser test needs Playwright: pip install playwright (no `playwright install`)") from exc

from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 90_000  # the first real inference warms TensorFlow up on a busy 2-core machine
CLASSES = ["dandelion", "grass"]
SETTLED = "#results .card:not([data-state='pending'])"


@pytest.fixture(scope="module")
def photos(api: str, data_dir: Path) -> dict[str, Path]:
    """For each class, the first photo (sorted) the model labels right with confidence >= 0.7, in domain.

    So the browser test checks the page, not the model's accuracy (test_integration measures that).
    """
    chosen: dict[str, Path] = {}
    with httpx.Client(base_url=api, timeout=60) as client:
        for label in ("dandelion", "grass"):
            for path in sorted((data_dir / label).glob("*.jpg"))[:40]:
                response = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
                assert response.status_code == 200, response.text
                body = response.json()
                if body["label"] == label and body["confidence"] >= 0.7 and body["in_domain"] is not False:
                    chosen[label] = path
                    break
            else:
                pytest.fail(f"the model labels none of the first 40 {label} photos right with confidence >= 0.7")
    return chosen


@pytest.fixture(scope="module")
def model(api: str) -> dict[str, str]:
    return httpx.get(f"{api}/model", timeout=10).json()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium is not at {CHROMIUM}: install Debian's package "
            "(apt-get install -y --no-install-recommends chromium) or set CHROMIUM_PATH"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class Recorded:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []


@pytest.fixture
def recorded() -> Recorded:
    return Recorded()


def open_page(
    browser: Browser, api: str, recorded: Recorded, width: int = 1200, height: int = 900, **device: bool
) -> Page:
    page = browser.new_page(viewport={"width": width, "height": height}, **device)
    page.set_default_timeout(WAIT_MS)
    # Intercept file choosers from the start: Playwright turns interception on without waiting, so a chooser
    # opened right after ``expect_file_chooser`` may otherwise become a real (headless, never-closing) dialog.
    page.on("filechooser", lambda chooser: None)
    page.on("request", lambda r: recorded.requests.append((r.method, r.url)))
    page.on("pageerror", lambda e: recorded.page_errors.append(str(e)))
    page.on("console", lambda m: recorded.console_errors.append(m.text) if m.type == "error" else None)
    response = page.goto(f"{api}/")
    assert response is not None and response.status == 200
    return page


@pytest.fixture
def page(browser: Browser, api: str, recorded: Recorded) -> Iterator[Page]:
    page = open_page(browser, api, recorded)
    yield page
    page.close()
    check_traffic(api, recorded)


def check_traffic(api: str, recorded: Recorded) -> None:
    """Only this server is contacted; besides the page and its assets, only POST /predict and /feedback; no
    script errors."""
    origin = urlparse(api)
    for method, url in recorded.requests:
        parsed = urlparse(url)
        if parsed.scheme == "blob":
            continue
        assert (parsed.scheme, parsed.netloc) == (origin.scheme, origin.netloc), f"the page contacted {url}"
        assert (method, parsed.path) in {("POST", "/predict"), ("POST", "/feedback")} or (
            method == "GET" and (parsed.path == "/" or parsed.path.startswith("/static/"))
        ), f"the page made an unexpected request: {method} {url}"
    assert recorded.page_errors == []
    # The browser logs failed requests (the refused text file) as console errors; nothing else may be logged.
    assert [m for m in recorded.console_errors if "Failed to load resource" not in m] == []


def settle(page: Page, count: int) -> None:
    page.wait_for_function(f"n => document.querySelectorAll({SETTLED!r}).length >= n", arg=count, timeout=WAIT_MS)


def cards(page: Page) -> list[dict]:
    return page.eval_on_selector_all(
        "#results .card",
        """cards => cards.map(c => ({
            state: c.dataset.state,
            label: c.dataset.label || null,
            filename: c.querySelector('.filename').textContent,
            verdict: c.querySelector('.label').textContent,
            spoken: c.querySelector('.verdict').textContent,
            error: c.querySelector('.error').hidden ? null : c.querySelector('.error').innerText,
            model: c.querySelector('.model')?.textContent ?? null,
            timing: c.querySelector('.timing')?.textContent ?? null,
            meta: c.querySelector('.meta').textContent,
            preview: c.querySelector('.thumb').naturalWidth > 0,
            bars: Array.from(c.querySelectorAll('[role=meter]')).map(m => ({
                cls: m.dataset.class, now: Number(m.getAttribute('aria-valuenow')),
                text: m.getAttribute('aria-valuetext')})),
        }))""",
    )


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the series of ``name`` that carry ``labels`` (whatever their other labels), 0 when none."""
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def predictions(recorded: Recorded) -> int:
    return sum(1 for method, url in recorded.requests if method == "POST" and urlparse(url).path == "/predict")


def assert_classified(card: dict, label: str, model: dict[str, str]) -> None:
    assert card["state"] == "done", card
    assert card["label"] == label
    assert card["verdict"] == label.capitalize()
    assert card["spoken"] == f"{label.capitalize()}, {card['bars'][CLASSES.index(label)]['text']} confidence"
    assert card["model"] == f"Model {model['name']} v{model['version']}"
    assert re.fullmatch(r"\d+ ms", card["timing"]), card["timing"]
    assert card["preview"], "the card shows a preview of the photo"
    assert [b["cls"] for b in card["bars"]] == CLASSES
    assert sum(b["now"] for b in card["bars"]) == pytest.approx(100, abs=0.2)
    winner = next(b for b in card["bars"] if b["cls"] == label)
    assert winner["now"] >= 70 and winner["text"] == f"{winner['now']:.1f}%"


def test_real_photos_get_their_labels(page: Page, photos: dict[str, Path], model: dict[str, str], recorded) -> None:
    page.set_input_files("#file", str(photos["dandelion"]))
    settle(page, 1)
    page.set_input_files("#file", str(photos["grass"]))
    settle(page, 2)
    newest, oldest = cards(page)
    assert newest["filename"] == photos["grass"].name and oldest["filename"] == photos["dandelion"].name
    assert_classified(oldest, "dandelion", model)
    assert_classified(newest, "grass", model)
    assert predictions(recorded) == 2


def test_telling_the_page_an_answer_was_wrong_records_the_true_label(
    page: Page, api: str, photos: dict[str, Path], recorded
) -> None:
    with page.expect_response(lambda r: "/predict" in r.url) as answer:
        page.set_input_files("#file", str(photos["dandelion"]))
    settle(page, 1)
    prediction_id = answer.value.json()["id"]
    feedback = page.locator("#results .card .feedback")
    assert feedback.is_visible() and "Right?" in feedback.inner_text()
    buttons = [b.inner_text() for b in feedback.locator("button").all()]
    assert buttons == ["Yes", "No, it is grass", "Neither"], "three answers on a card in domain too"
    wrong_before = metric(httpx.get(f"{api}/metrics", timeout=10).text, "model_feedback_total", outcome="wrong")
    page.get_by_role("button", name="No, it is grass").click()
    page.wait_for_function("() => document.querySelector('#results .card .feedback').dataset.status", timeout=WAIT_MS)
    assert feedback.inner_text() == "Thanks: recorded as grass."
    # Recorded server-side (the prediction log's row and its feedback): the same label again is "unchanged",
    # another one a conflict.
    again = httpx.post(f"{api}/feedback", json={"prediction_id": prediction_id, "label": "grass"}, timeout=30)
    assert again.status_code == 200 and again.json()["status"] == "unchanged"
    assert (again.json()["label"], again.json()["predicted"], again.json()["correct"]) == ("grass", "dandelion", False)
    assert httpx.post(f"{api}/feedback", json={"prediction_id": prediction_id, "label": "dandelion"}).status_code == 409
    wrong = metric(httpx.get(f"{api}/metrics", timeout=10).text, "model_feedback_total", outcome="wrong")
    assert wrong == wrong_before + 1


def test_a_text_file_gets_a_clear_error(page: Page, tmp_path: Path, recorded) -> None:
    notes = tmp_path / "notes.jpg"
    notes.write_text("these are my notes, not a photo\n")
    page.set_input_files("#file", str(notes))
    settle(page, 1)
    (card,) = cards(page)
    assert card["state"] == "error" and card["label"] is None and card["bars"] == []
    assert card["verdict"] == "Not an image"
    assert "not a photo the model can read" in card["error"]
    assert "INVALID_IMAGE" in card["meta"] and "HTTP 400" in card["meta"]
    assert page.get_by_role("alert").filter(has_text="not a photo").is_visible()
    assert predictions(recorded) == 1


def test_several_photos_at_once_get_one_result_each(
    page: Page, photos: dict[str, Path], model: dict[str, str], tmp_path: Path, recorded
) -> None:
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    page.set_input_files("#file", [str(photos["dandelion"]), str(photos["grass"]), str(notes)])
    settle(page, 3)
    dandelion, grass, text = cards(page)
    assert_classified(dandelion, "dandelion", model)
    assert_classified(grass, "grass", model)
    assert text["state"] == "error" and text["filename"] == "notes.jpg"
    assert predictions(recorded) == 3, "one request per photo, so one bad file does not fail the others"
    page.screenshot(path=ARTIFACTS / "upload-page-desktop.png", full_page=True)


def test_a_file_over_the_limit_is_refused_without_a_request(page: Page, recorded) -> None:
    page.set_input_files("#file", {"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\xff" * (10 << 20 | 1)})
    settle(page, 1)
    (card,) = cards(page)
    assert card["state"] == "error" and card["verdict"] == "Too large"
    assert "at most 10 MB" in card["error"]
    page.set_input_files("#file", {"name": "readme.txt", "mimeType": "text/plain", "buffer": b"hello"})
    settle(page, 2)
    text = cards(page)[0]
    assert text["verdict"] == "Not an image" and "text/plain" in text["error"]
    assert predictions(recorded) == 0


def test_keyboard_paste_and_drop(page: Page, photos: dict[str, Path], model: dict[str, str], recorded) -> None:
    # Tab: the skip link first, then the drop zone; Enter opens the file picker (as the hint says).
    assert page.locator(".keyboard-hint").is_visible()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip-link"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "dropzone"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    assert chooser.value.is_multiple()
    chooser.value.set_files(str(photos["grass"]))
    settle(page, 1)
    with page.expect_file_chooser():
        page.keyboard.press(" ")

    # Ctrl+V of an image, then a photo dropped on the drop zone: both as the browser delivers them.
    put_file = """([b64, name, kind, target]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: 'image/jpeg'}));
        const where = document.querySelector(target);
        if (kind === 'paste') {
            where.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));
        } else {
            for (const type of ['dragenter', 'dragover', 'drop']) {
                where.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
            }
        }
    }"""
    dandelion = base64.b64encode(photos["dandelion"].read_bytes()).decode()
    page.evaluate(put_file, [dandelion, "pasted.jpg", "paste", "body"])
    settle(page, 2)
    page.evaluate(put_file, [dandelion, "dropped.jpg", "drop", "#dropzone"])
    settle(page, 3)
    dropped, pasted, chosen = cards(page)
    assert (pasted["filename"], dropped["filename"]) == ("pasted.jpg", "dropped.jpg")
    assert_classified(chosen, "grass", model)
    assert_classified(pasted, "dandelion", model)
    assert_classified(dropped, "dandelion", model)
    assert not page.eval_on_selector("#dropzone", "z => z.classList.contains('dragging')")

    # Clear empties the results and gives focus back to the drop zone.
    page.get_by_role("button", name="Clear results").click()
    assert cards(page) == []
    assert page.evaluate("document.activeElement.id") == "dropzone"


def unsure_photo(api: str, photos: dict[str, Path], path: Path) -> float:
    """A blend of a real dandelion and a real grass photo that the model answers with about 60 % confidence
    (bisection on the blend weight: the answer moves continuously from one class to the other); its confidence."""
    with Image.open(photos["dandelion"]) as d, Image.open(photos["grass"]) as g:
        dandelion, grass = d.convert("RGB").resize((224, 224)), g.convert("RGB").resize((224, 224))
    low, high = 0.0, 1.0  # P(dandelion) is high at 0 (all dandelion), low at 1
    with httpx.Client(base_url=api, timeout=60) as client:
        for _ in range(12):
            weight = (low + high) / 2
            Image.blend(dandelion, grass, weight).save(path, "PNG")
            body = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
            p_dandelion = body["probabilities"]["dandelion"]
            if 0.55 <= body["confidence"] < 0.65 and body["in_domain"] is not False:
                assert body["low_confidence"] is True
                return body["confidence"]
            low, high = (weight, high) if p_dandelion > 0.6 else (low, weight)
    pytest.fail("no blend of the two photos got an answer between 55 % and 65 %")


def test_an_unsure_answer_says_not_sure(page: Page, api: str, photos: dict[str, Path], tmp_path: Path, recorded):
    path = tmp_path / "blend.png"
    confidence = unsure_photo(api, photos, path)
    page.set_input_files("#file", str(path))
    settle(page, 1)
    (card,) = cards(page)
    assert card["state"] == "done" and card["verdict"] == f"Not sure: perhaps {card['label']}"
    assert card["spoken"].endswith(f"{confidence * 100:.1f}% confidence")
    assert page.eval_on_selector("#results .card", "c => c.dataset.unsure") == "true"
    page.set_input_files("#file", str(photos["grass"]))  # a confident answer next to it looks different
    settle(page, 2)
    assert page.eval_on_selector("#results .card", "c => c.dataset.unsure") == "false"
    page.screenshot(path=ARTIFACTS / "upload-page-unsure.png", full_page=True)


FLAGGED = {
    "unlike_training_photos": "This does not look like a photo of dandelions or grass",
    "looks_like_refused_kind": "This looks like another flower, not a dandelion",
}
NEUTRAL = "rgb(123, 135, 148)"  # style.css --neutral


def test_a_photo_of_something_else_is_called_neither(page: Page, api: str, tmp_path: Path, recorded) -> None:
    """The flagged card asks for one of three answers, with an accent that gives no class away, and "Neither" is
    stored as neither (never as the class the model would have said) and counted as a confirmed flag."""
    from tests.api.test_integration import other_images

    path = tmp_path / "cat.png"
    path.write_bytes(other_images()["a cat"])
    with page.expect_response(lambda r: "/predict" in r.url) as answer:
        page.set_input_files("#file", str(path))
    settle(page, 1)
    body = answer.value.json()
    (card,) = cards(page)
    assert card["state"] == "done"
    assert body["in_domain"] is False and card["verdict"] == FLAGGED[body["out_of_domain_reason"]]
    assert card["spoken"].startswith(card["verdict"] + "; the model would say ")  # nothing hidden
    assert [b["cls"] for b in card["bars"]] == CLASSES
    assert page.eval_on_selector("#results .card", "c => c.dataset.outside") == "true"
    assert page.eval_on_selector("#results .card", "c => getComputedStyle(c).borderLeftColor") == NEUTRAL
    feedback = page.locator("#results .card .feedback")
    assert feedback.locator(".feedback-question").inner_text() == "Is it dandelion, grass, or neither?"
    assert [b.inner_text() for b in feedback.locator("button").all()] == ["Dandelion", "Grass", "Neither"]
    page.screenshot(path=ARTIFACTS / "upload-page-neither.png", full_page=True)
    before = metric(httpx.get(f"{api}/metrics", timeout=10).text, "model_feedback_total", outcome="neither")

    page.get_by_role("button", name="Neither").click()
    page.wait_for_function("() => document.querySelector('#results .card .feedback').dataset.status", timeout=WAIT_MS)
    assert feedback.inner_text() == "Thanks: recorded as neither."
    # The prediction log holds the flagged answer and its neither label; grass would now be a conflict.
    again = httpx.post(f"{api}/feedback", json={"prediction_id": body["id"], "label": "neither"}, timeout=30)
    assert again.status_code == 200 and again.json()["status"] == "unchanged"
    assert again.json() | {"model": None} == {
        "prediction_id": body["id"],
        "label": "neither",
        "predicted": body["label"],
        "correct": None,
        "in_domain": False,
        "domain_outcome": "confirmed_out_of_domain",
        "model": None,
        "status": "unchanged",
    }
    assert httpx.post(f"{api}/feedback", json={"prediction_id": body["id"], "label": "grass"}).status_code == 409
    text = httpx.get(f"{api}/metrics", timeout=10).text
    assert metric(text, "model_feedback_total", outcome="neither") == before + 1
    assert metric(text, "model_domain_feedback_total", outcome="confirmed_out_of_domain") >= 1


def test_why_shows_and_hides_where_the_model_looked(page: Page, api: str, photos: dict[str, Path], recorded) -> None:
    assert httpx.get(f"{api}/model", timeout=10).json()["explains"] is True, "the served version has no map"
    with page.expect_response(lambda r: "/predict" in r.url) as answer:
        page.set_input_files("#file", str(photos["dandelion"]))
    settle(page, 1)
    explain = answer.value.json()["explain"]
    overlay, why = page.locator("#results .card .heatmap"), page.locator("#results .card .why")
    assert not overlay.is_visible() and why.get_attribute("aria-pressed") == "false"
    why.click()
    assert overlay.is_visible() and overlay.get_attribute("src") == explain["png"]
    grid = page.eval_on_selector("#results .card .heatmap", "i => [i.naturalWidth, i.naturalHeight]")
    assert grid == explain["grid"], "the map's PNG was decoded (allowed by the page's CSP) at its grid size"
    page.screenshot(path=ARTIFACTS / "upload-page-why-real.png", full_page=True)
    why.click()
    assert not overlay.is_visible() and why.get_attribute("aria-pressed") == "false"


def test_phone_sized_screen(browser: Browser, api: str, photos: dict[str, Path], tmp_path: Path) -> None:
    recorded = Recorded()
    page = open_page(browser, api, recorded, width=390, height=844, has_touch=True, is_mobile=True)
    try:
        notes = tmp_path / "notes.jpg"
        notes.write_text("not a photo")
        page.set_input_files("#file", [str(photos["dandelion"]), str(photos["grass"]), str(notes)])
        settle(page, 3)
        assert [c["label"] for c in cards(page)] == ["dandelion", "grass", None]
        widths = page.evaluate(
            "({scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth})"
        )
        assert widths["scroll"] <= widths["client"] == 390, f"the page scrolls sideways: {widths}"
        for selector in ("#dropzone", "#results .card"):
            box = page.locator(selector).first.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        # A phone has no Enter key to browse with, no Ctrl+V and nothing to drop: the page does not say so.
        assert not page.locator(".keyboard-hint").is_visible()
        assert page.locator("#drop-title").inner_text() == "Choose or take a photo"
        assert "JPEG" in page.locator("#drop-hint").inner_text()
        # The feedback buttons keep their words on one line, and all three share one line: "No, it is dandelion"
        # is as tall as "Yes" and beside it, not on a line of its own.
        for feedback in page.locator("#results .card .feedback").all()[:2]:
            yes, no, neither = (button.bounding_box() for button in feedback.locator("button").all())
            assert yes is not None and no is not None and neither is not None
            assert abs(no["height"] - yes["height"]) < 1, f"a feedback button wraps: {no} vs {yes}"
            assert abs(no["y"] - yes["y"]) < 1 and abs(neither["y"] - yes["y"]) < 1, f"{yes} {no} {neither}"
        assert page.locator("#results .card .feedback button", has_text="No, it is dandelion").count() == 1
        spilled = page.eval_on_selector_all(
            "#results .card",
            """cards => cards.flatMap(card => {
                const outer = card.getBoundingClientRect();
                return Array.from(card.querySelectorAll('*'))
                    .filter(e => e.getClientRects().length && !e.closest('.visually-hidden'))
                    .filter(e => { const r = e.getBoundingClientRect(); return r.right > outer.right + 0.5; })
                    .map(e => `${e.className}: ${e.textContent.slice(0, 30)}`);
            })""",
        )
        assert spilled == [], "text spills out of the result cards"
        page.screenshot(path=ARTIFACTS / "upload-page-phone.png", full_page=True)
    finally:
        page.close()
    check_traffic(api, recorded)
