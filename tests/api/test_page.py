"""The upload page at ``/`` with a fake model: the HTML and its assets, headers, and nothing fetched from elsewhere."""

from __future__ import annotations

import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from services.api.routes import page
from services.api.routes.page import ASSETS, STATIC_DIR

REPO = Path(__file__).resolve().parents[2]

TEXT_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


class Elements(HTMLParser):
    """Every start tag's attributes, by tag, plus the text of each element with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def parse(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    return parser


async def test_index_serves_the_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = parse(response.text)

    (file_input,) = page.find("input", id="file")
    assert file_input["type"] == "file" and "multiple" in file_input and "image/jpeg" in file_input["accept"]
    assert page.find("label", **{"for": "file"}), "the file input has a label"

    (dropzone,) = page.find("div", id="dropzone")
    assert dropzone["tabindex"] == "0" and dropzone["role"] == "button"
    assert dropzone["aria-describedby"] == "drop-hint"

    (results,) = page.find("ol", id="results")
    assert results["aria-live"] == "polite"

    assert page.find("meta", name="viewport"), "phone-sized screens get a viewport"
    assert page.find("script", src="/static/app.js")
    assert page.find("link", rel="stylesheet", href="/static/style.css")
    assert "10&nbsp;MB" in response.text, "the size limit is stated on the page"
    assert page.find("a", href="/model/card"), "the footer links to the served version's model card"


async def test_security_headers_on_page_and_assets(client: httpx.AsyncClient) -> None:
    for path in ["/", *(f"/static/{name}" for name in ASSETS)]:
        response = await client.get(path)
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'", "no inline or remote scripts"
        assert directives["style-src"] == "'self'"
        assert directives["connect-src"] == "'self'"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["etag"]


@pytest.mark.parametrize(("name", "media_type"), [*TEXT_ASSETS.items(), ("favicon.svg", "image/svg+xml")])
async def test_assets_have_their_content_types(client: httpx.AsyncClient, name: str, media_type: str) -> None:
    response = await client.get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == media_type
    assert response.content == (STATIC_DIR / name).read_bytes()


async def test_assets_revalidate_with_their_etag(client: httpx.AsyncClient) -> None:
    first = await client.get("/static/app.js")
    again = await client.get("/static/app.js", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    changed = await client.get("/static/app.js", headers={"if-none-match": '"stale"'})
    assert changed.status_code == 200 and changed.content == first.content


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fapp.py", "/static/index.html", "/static/"])
async def test_only_known_assets_are_served(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404
    assert response.json()["error_code"] == "NOT_FOUND"


async def test_nothing_is_fetched_from_elsewhere(client: httpx.AsyncClient) -> None:
    texts = {"index.html": (await client.get("/")).text}
    for name in TEXT_ASSETS:
        texts[name] = (await client.get(f"/static/{name}")).text
    for name, text in texts.items():
        assert "http://" not in text and "https://" not in text, f"{name} refers to another host"
        assert not re.search(r"(?<![\w/])//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{name} has a protocol-relative URL"
        assert "@import" not in text and "@font-face" not in text, f"{name} loads fonts or stylesheets"
    # The favicon's only URL is the SVG namespace, which is never fetched.
    svg = (await client.get("/static/favicon.svg")).text
    assert re.findall(r"https?://[^\"' ]+", svg) == ["http://www.w3.org/2000/svg"]


async def test_no_inline_scripts_or_styles(client: httpx.AsyncClient) -> None:
    """The CSP allows only same-origin files, so inline code would be refused by the browser."""
    html = (await client.get("/")).text
    page = parse(html)
    assert all(attrs.get("src") for attrs in page.find("script")), "every <script> has a src"
    assert "<style" not in html
    assert not [a for _, a in page.tags if "style" in a or any(k.startswith("on") for k in a)]


async def test_the_page_calls_predict_and_feedback_and_nothing_else(client: httpx.AsyncClient) -> None:
    script = (await client.get("/static/app.js")).text
    assert re.findall(r"fetch\(\s*\"([^\"]+)\"", script) == ["/predict?explain=true", "/feedback"]
    assert "XMLHttpRequest" not in script and "WebSocket" not in script and "sendBeacon" not in script
    assert "innerHTML" not in script, "file names are rendered as text, never as markup"


async def test_page_is_not_in_the_api_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths and "/static/{name}" not in paths


async def test_a_build_without_the_page_still_serves_the_api(client: httpx.AsyncClient, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(page, "STATIC_DIR", tmp_path)
    page.load.cache_clear()
    try:
        response = await client.get("/")
        assert response.status_code == 503
        assert response.json()["error_code"] == "PAGE_NOT_INSTALLED"
        assert (await client.get("/health/ready")).status_code == 200
    finally:
        page.load.cache_clear()


def test_the_page_files_are_package_data() -> None:
    """The image installs the project as a wheel (``pip install .[api]``): static/ must be in it."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools.get("package-data", {}).get("services.api", [])
    assert "static/*" in patterns, 'add [tool.setuptools.package-data] "services.api" = ["static/*"] to pyproject.toml'


def test_the_page_quotes_the_accepted_formats_of_the_decoder() -> None:
    """One list (shared.images.ACCEPTED_FORMATS): the page's text, its script's messages and the file picker's
    filter say what the decoder accepts, and nothing else."""
    from services.api.routes.page import STATIC_DIR
    from shared.images import ACCEPTED, ACCEPTED_FORMATS, MIME_TYPES

    html = (STATIC_DIR / "index.html").read_text()
    script = (STATIC_DIR / "app.js").read_text()
    assert ACCEPTED in html
    assert f'const ACCEPTED = "{ACCEPTED}";' in script
    picker = set(html.split('accept="', 1)[1].split('"', 1)[0].split(","))
    assert picker == {MIME_TYPES[f] for f in ACCEPTED_FORMATS}
