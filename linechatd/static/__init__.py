"""The browser client and the demo page, served only when ``[http] demo_page = true``.

The files are package data; a fixed table maps url paths to them, so no
request path ever reaches the filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Final

__all__ = ["CONTENT_SECURITY_POLICY", "Asset", "asset_for", "asset_paths"]

# The page runs only its own files: no inline script or style, no third parties.
# The WebSocket lives on another port (another origin), hence ws:/wss: in connect-src.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_HTML: Final = "text/html; charset=utf-8"
_JS: Final = "text/javascript; charset=utf-8"
_CSS: Final = "text/css; charset=utf-8"
_SVG: Final = "image/svg+xml"

# url path -> (file in this package, content type)
_ASSETS: Final = MappingProxyType(
    {
        "/": ("demo.html", _HTML),
        "/static/linechat.js": ("linechat.js", _JS),
        "/static/demo.js": ("demo.js", _JS),
        "/static/demo.css": ("demo.css", _CSS),
        "/static/favicon.svg": ("favicon.svg", _SVG),
    }
)


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def asset_paths() -> tuple[str, ...]:
    return tuple(_ASSETS)


def asset_for(path: str) -> Asset | None:
    """The file served at url ``path``, or None when there is none."""
    entry = _ASSETS.get(path)
    if entry is None:
        return None
    name, content_type = entry
    # Read per request: a few kilobytes, and an edited file shows on reload.
    body = resources.files(__name__).joinpath(name).read_bytes()
    headers = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
    if content_type == _HTML:
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return Asset(body, content_type, headers)
