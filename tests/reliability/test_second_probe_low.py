"""The second hostile probe's LOW findings (issue #23), each against the app (fake model) as a client sends it."""

from __future__ import annotations

import gzip
import re

import httpx
import numpy as np
import orjson
import pytest

from services.api import protocol
from services.api.errors import BadRequest
from tests.api.test_app import YELLOW

IMAGE = orjson.dumps({"inputs": np.full((1, 224, 224, 3), 0.5, np.float32)}, option=orjson.OPT_SERIALIZE_NUMPY)
JSON = {"content-type": "application/json"}


def with_first_value(body: bytes, token: bytes) -> bytes:
    start = body.index(b"[[[[") + 4
    return body[:start] + token + body[body.index(b",", start) :]


@pytest.mark.parametrize("token", [b"true", b"false"])
async def test_a_json_boolean_is_not_a_pixel(client: httpx.AsyncClient, token: bytes) -> None:
    """``true`` was read as 1.0 (numpy's bool -> float), answering 200."""
    response = await client.post("/invocations", content=with_first_value(IMAGE, token), headers=JSON)
    assert response.status_code == 400, response.text
    assert "true and false" in response.json()["message"] or "numbers only" in response.json()["message"]
    with pytest.raises(BadRequest):  # the small-body path too
        protocol.parse_body(b'{"inputs": [[[[true, 0.5, 0.5]]]]}', max_instances=8)


async def test_compressed_or_labelled_compressed_bodies_answer_415(client: httpx.AsyncClient) -> None:
    """A gzip body answered "not valid UTF-8" (400); a plain body labelled gzip was read as plain (200)."""
    gzipped = gzip.compress(IMAGE)
    labelled = await client.post("/invocations", content=gzipped, headers={**JSON, "content-encoding": "gzip"})
    unlabelled = await client.post("/invocations", content=gzipped, headers=JSON)
    lying = await client.post("/invocations", content=IMAGE, headers={**JSON, "content-encoding": "gzip"})
    assert [r.status_code for r in (labelled, unlabelled, lying)] == [415] * 3, lying.text
    assert "uncompressed" in labelled.json()["message"] and "gzip" in unlabelled.json()["message"]
    plain = await client.post("/invocations", content=IMAGE, headers={**JSON, "content-encoding": "identity"})
    assert plain.status_code == 200, plain.text


async def raw(client: httpx.AsyncClient, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    """One request as the server would hand it to the app, headers exactly as given (httpx adds a Host)."""
    app = client._transport.app  # type: ignore[attr-defined]
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 5555), "server": ("api", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    return sent[0]


async def test_no_host_or_two_hosts_answer_400(client: httpx.AsyncClient) -> None:
    assert (await raw(client, "GET", "/model", []))["status"] == 400
    assert (await raw(client, "GET", "/model", [(b"host", b"a"), (b"host", b"b")]))["status"] == 400
    assert (await raw(client, "GET", "/model", [(b"host", b"api")]))["status"] == 200


async def test_invented_methods_add_no_metric_series(client: httpx.AsyncClient) -> None:
    """PROPFIND, MKCOL, QUERY... each added series per route; now they are all ``other`` (still a 405)."""
    for method in ("PROPFIND", "MKCOL", "QUERY", "X-RANDOM-1", "X-RANDOM-2"):
        assert (await client.request(method, "/predict")).status_code == 405
    text = (await client.get("/metrics")).text
    methods = set(re.findall(r'http_requests_total\{handler="/predict",method="([^"]+)"', text))
    assert methods == {"other"}, methods
    assert re.search(r'http_requests_total\{handler="/predict",method="other",status="4xx"\} 5\.0', text), text


async def test_allow_on_get_routes_names_head(client: httpx.AsyncClient) -> None:
    response = await client.post("/model")
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"GET", "HEAD"}
    assert (await client.head("/model")).status_code == 200


async def test_json_errors_are_never_sniffed(client: httpx.AsyncClient) -> None:
    answers = [
        await client.post("/predict", files={"file": ("x.png", b"<html><script>alert(1)</script>")}),
        await client.get("/no-such-page"),
        await client.post("/invocations", content=b"{", headers=JSON),
        await client.post("/model"),
        await client.post("/predict", files={"file": ("y.png", YELLOW)}),
    ]
    assert [a.status_code for a in answers] == [400, 404, 400, 405, 200]
    assert all(a.headers.get("x-content-type-options") == "nosniff" for a in answers), [a.headers for a in answers]
