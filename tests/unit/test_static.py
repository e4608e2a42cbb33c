"""The demo page's files: how the HTTP API serves them.

The JS client's own logic is tested under Node (clients/js/test, run by
tests/unit/test_js_package.py); the whole thing in a real browser is
tests/integration/test_browser.py.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from linechatd.config import parse_config
from linechatd.http import HttpApi
from linechatd.static import CONTENT_SECURITY_POLICY, asset_for, asset_paths

STATIC_DIR = Path(__file__).resolve().parents[2] / "linechatd" / "static"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def make_api(demo_page: bool) -> HttpApi:
    config = parse_config(
        {
            "zookeeper": {"hosts": "127.0.0.1:2181"},
            "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
            "http": {"demo_page": demo_page},
        }
    )
    ctx = SimpleNamespace(config=SimpleNamespace(value=config))
    return HttpApi(ctx, instance=None)  # type: ignore[arg-type]


async def request(api: HttpApi, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": []}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await api(scope, receive, send)
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, body["body"]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/static/linechat.js", "text/javascript; charset=utf-8"),
        ("/static/demo.js", "text/javascript; charset=utf-8"),
        ("/static/demo.css", "text/css; charset=utf-8"),
        ("/static/favicon.svg", "image/svg+xml"),
    ],
)
async def test_demo_files_are_served_when_enabled(path: str, content_type: str) -> None:
    status, headers, body = await request(make_api(demo_page=True), "GET", path)
    assert status == 200
    assert headers["content-type"] == content_type
    assert headers["x-content-type-options"] == "nosniff"
    assert int(headers["content-length"]) == len(body) > 0
    if path == "/":
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY


@pytest.mark.parametrize("path", ["/", "/static/linechat.js", "/static/demo.css"])
async def test_demo_files_are_not_found_when_disabled(path: str) -> None:
    status, headers, body = await request(make_api(demo_page=False), "GET", path)
    assert status == 404
    assert json.loads(body) == {"error": "not_found"}


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/__init__.py",
        "/static/../http.py",
        "/static/%2e%2e/http.py",
        "/demo.html",
        "/static/linechat.js/",
    ],
)
async def test_only_the_listed_files_are_served(path: str) -> None:
    status, _headers, _body = await request(make_api(demo_page=True), "GET", path)
    assert status == 404
    assert asset_for(path) is None


async def test_other_methods_do_not_reach_the_files() -> None:
    status, _headers, _body = await request(make_api(demo_page=True), "POST", "/")
    assert status == 404


async def test_api_routes_still_win_with_the_demo_on() -> None:
    status, headers, body = await request(make_api(demo_page=True), "GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_every_asset_exists_and_is_package_data() -> None:
    for path in asset_paths():
        asset = asset_for(path)
        assert asset is not None and asset.body, path
    package_data = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]
    assert "static/*" in package_data["linechatd"]


def test_the_page_needs_no_inline_script_or_style() -> None:
    # The CSP forbids both; an inline one would silently not run.
    html = (STATIC_DIR / "demo.html").read_text()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, tag
    assert not re.search(r"<script\b[^>]*>(?!\s*</script>)", html), "inline script"
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    # Every file the page loads is one the server serves.
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert asset_for(ref) is not None, ref
