"""The viewer page: one self-contained HTML document (inline CSS and JS, no network but its own
data URL), with the view-model embedded as inert JSON."""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import logging
import os
import re
import tempfile
import webbrowser
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rlm_mcp import __version__
from rlm_mcp.errors import ConfigError

log = logging.getLogger(__name__)

MCP_APP_MIME = "text/html;profile=mcp-app"
APP_RESOURCE_URI = "ui://rlm-mcp/run-viewer"
APP_PROTOCOL_VERSION = "2026-01-26"  # the MCP Apps revision the page speaks (ui/initialize)
VIEW_TOOL = "rlm_get_run_view"
DEFAULT_POLL_MS = 1_000

_SLOT = re.compile(r"__(CSP|TITLE|STYLE|CONFIG|DATA|SCRIPT)__")


@functools.cache
def _assets() -> tuple[str, str, str]:
    folder = resources.files("rlm_mcp.viewer") / "assets"
    return tuple((folder / name).read_text(encoding="utf-8")  # type: ignore[return-value]
                 for name in ("viewer.html", "viewer.css", "viewer.js"))


def script_json(value: Any) -> str:
    """JSON that is inert inside ``<script type="application/json">``: no ``<``, ``>`` or ``&``
    survive, so no string in it can close the element or open a comment."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp(script: str, connect: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    # Only the page's own script runs (by hash): markup that slipped into the page could not run code.
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
            f"connect-src {connect}; base-uri 'none'; form-action 'none'")


def _connect_source(data_url: str | None, mcp_app: bool) -> str:
    if mcp_app or data_url is None:
        return "'none'"
    parts = urlsplit(data_url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"'self' {parts.scheme}://{parts.netloc}"
    if parts.scheme or parts.netloc:
        raise ConfigError(f"data_url {data_url!r} must be a path on this server or an http(s) URL")
    return "'self'"


def render_html(view: dict[str, Any] | None, *, data_url: str | None = None, mcp_app: bool = False,
                poll_ms: int = DEFAULT_POLL_MS, view_tool: str = VIEW_TOOL) -> str:
    """The viewer page.

    ``view``: a view-model from :func:`build_view` to embed (None: the page fetches or receives it).
    ``data_url``: served mode; the page polls this URL for the view-model JSON while the run is
    running (sending ``If-None-Match: "<etag>"``), and loads it first when ``view`` is None.
    ``mcp_app``: the MCP App resource (no data; it talks to the host over postMessage and calls
    ``view_tool`` for the view-model)."""
    if mcp_app and data_url is not None:
        raise ConfigError("an MCP App page gets its data from the host: give data_url or mcp_app, not both")
    template, style, script = _assets()
    config = {"mode": "mcp-app" if mcp_app else ("served" if data_url else "static"), "data_url": data_url,
              "poll_ms": max(200, int(poll_ms)), "view_tool": view_tool, "version": __version__}
    title = "rlm-mcp run viewer"
    if view is not None:
        title = f"RLM run {view.get('run_id', '')} ({view.get('root', {}).get('status', '')})"
    csp = html.escape(_csp(script, _connect_source(data_url, mcp_app)), quote=False).replace('"', "&quot;")
    slots = {"CSP": csp,
             "TITLE": html.escape(title), "STYLE": style, "CONFIG": script_json(config),
             "DATA": script_json(view), "SCRIPT": script}
    # One pass: text put into a slot is never scanned for further slots.
    return _SLOT.sub(lambda match: slots[match.group(1)], template)


def app_html() -> str:
    """The ``ui://`` resource's HTML (the same for every run: data comes through the host)."""
    return render_html(None, mcp_app=True)


def write_html(page: str, out: str | Path) -> Path:
    """Write the page atomically (a reader never sees half a file); returns the absolute path."""
    target = Path(out).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".view-", suffix=".html", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(page)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def open_in_browser(path: str | Path) -> bool:
    """Open a written page in the default browser; False (and a log line) when none can be started."""
    uri = Path(path).resolve().as_uri()
    try:
        opened = webbrowser.open(uri)
    except webbrowser.Error as exc:
        log.warning("could not open a browser (%s): open %s yourself", exc, uri)
        return False
    if not opened:
        log.warning("no browser could be started: open %s yourself", uri)
    return opened
