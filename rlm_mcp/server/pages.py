"""The run viewer served next to ``/mcp`` on the HTTP transports: ``/runs`` (recent runs),
``/runs/{run_id}`` (the viewer page) and ``/runs/{run_id}/view.json`` (what the page polls).

Same walls as ``/mcp``: the bearer token and, on loopback binds, the Host check against DNS
rebinding; an ``Origin`` header, when a browser sends one, must be this server's own origin.
A browser cannot put an ``Authorization`` header on a navigation, so a ``/runs`` URL accepts the
token once as ``?token=``: the answer is a redirect to the same URL without it (out of the
address bar, history and Referer) that sets a cookie. The cookie is HttpOnly (no script reads
it), SameSite=Strict (no other site's page can make the browser send it), limited to ``/runs``
and named after the port (servers on other ports of the same host keep theirs). Its value is an
HMAC of the token, not the token: it opens the read-only pages and never ``/mcp``, which stays
header-only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from rlm_mcp.engine.runs import check_run_id
from rlm_mcp.errors import RlmError
from rlm_mcp.services import Services
from rlm_mcp.viewer import build_view, render_html, run_summaries, view_etag

PREFIX = "/runs"
LIST_LIMIT = 200
_COOKIE_PURPOSE = b"rlm-mcp /runs viewer cookie v1"
_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
            (b"content-security-policy", b"frame-ancestors 'none'")]


def cookie_name(port: int) -> str:
    return f"rlm_mcp_runs_{port}"


def cookie_value(token: str) -> str:
    return hmac.new(token.encode(), _COOKIE_PURPOSE, hashlib.sha256).hexdigest()


def is_runs_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


class RunPages:
    """ASGI app answering ``/runs`` paths and passing every other request to ``app`` (``/mcp``
    with its own header-only token check)."""

    def __init__(self, app: Any, services: Services, *, token: str | None, port: int,
                 host_allowed: Callable[[str], bool] | None) -> None:
        self.app = app
        self.services = services
        self.token = token
        self.cookie = cookie_name(port)
        self.host_allowed = host_allowed  # None: any Host (a public bind; the token protects it)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_runs_path(scope.get("path") or ""):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                   for name, value in scope.get("headers") or []}
        refusal = self._refusal(headers)
        if refusal is not None:
            await _send(send, 403, "text/plain; charset=utf-8", refusal.encode())
            return
        if scope.get("method") not in ("GET", "HEAD"):
            await _send(send, 405, "text/plain; charset=utf-8", b"the run pages are read-only: use GET",
                        [(b"allow", b"GET, HEAD")])
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        supplied = [value for name, value in query if name == "token"]
        if supplied:  # the token once, from a link: trade it for the cookie and drop it from the URL
            if self.token is not None and not hmac.compare_digest(supplied[-1].encode(), self.token.encode()):
                await self._unauthorized(send, "the token in the link is wrong")
                return
            rest = urlencode([(name, value) for name, value in query if name != "token"])
            location = scope["path"] + (f"?{rest}" if rest else "")
            extra = [(b"location", location.encode())]
            if self.token is not None:
                extra.append((b"set-cookie", (f"{self.cookie}={cookie_value(self.token)}; Path={PREFIX}; "
                                              "HttpOnly; SameSite=Strict").encode()))
            await _send(send, 303, "text/plain; charset=utf-8", b"", extra)
            return
        if not self._authorized(headers):
            await self._unauthorized(send, "no token")
            return
        status, content_type, body, extra = await self._answer(scope["path"], headers)
        await _send(send, status, content_type, b"" if scope.get("method") == "HEAD" else body, extra)

    # ----- walls -------------------------------------------------------------------------------

    def _refusal(self, headers: dict[str, str]) -> str | None:
        host = headers.get("host", "")
        if self.host_allowed is not None and not self.host_allowed(host):
            return f"refused: Host {host[:100]!r} is not this server's address (DNS rebinding protection)"
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
                return f"refused: a page from {origin[:100]!r} may not read this server's runs"
        return None

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.token is None:
            return True
        scheme, _, supplied = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(supplied.strip().encode(), self.token.encode()):
            return True
        expected = cookie_value(self.token)
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie and hmac.compare_digest(value.encode(), expected.encode()):
                return True
        return False

    async def _unauthorized(self, send: Any, why: str) -> None:
        body = _page("rlm-mcp: token needed", (
            f"<h1>Token needed</h1><p>{html.escape(why)}. Open this page once with <code>?token=TOKEN</code> "
            "added to its address, where TOKEN is the server's RLM_MCP_AUTH_TOKEN or the token it printed at "
            "start (also in its token file). The browser then keeps a cookie for these pages; API clients can "
            "send <code>Authorization: Bearer TOKEN</code> instead.</p>"))
        await _send(send, 401, "text/html; charset=utf-8", body, [(b"www-authenticate", b"Bearer")])

    # ----- pages -------------------------------------------------------------------------------

    async def _answer(self, path: str, headers: dict[str, str]) -> tuple[int, str, bytes, list[tuple[bytes, bytes]]]:
        if path in (PREFIX, PREFIX + "/"):
            summaries = await asyncio.to_thread(run_summaries, self.services.engine.trajectory_dir, LIST_LIMIT)
            return 200, "text/html; charset=utf-8", _list_page(summaries), []
        rest = path[len(PREFIX) + 1:]
        data = rest.endswith("/view.json")
        run_id = rest.removesuffix("/view.json")
        try:
            check_run_id(run_id)
        except RlmError as exc:
            return 404, "text/plain; charset=utf-8", str(exc).encode(), []
        directory = self.services.engine.trajectory_dir
        try:
            known = await asyncio.to_thread(self.services.runs.trajectory, run_id)  # settles a dead server's run
            if known is None:
                queued = run_id in self.services.runs.runs
                message = (f"run {run_id} has not started yet (queued): reload in a moment" if queued else
                           f"no run {run_id} here: {PREFIX} lists this server's runs")
                return 404, "text/plain; charset=utf-8", message.encode(), []
            if data:
                etag = await asyncio.to_thread(view_etag, directory, run_id)
                tag = f'"{etag}"'
                if headers.get("if-none-match", "") == tag:
                    return 304, "application/json", b"", [(b"etag", tag.encode())]
                body, etag = await asyncio.to_thread(_view_json, directory, run_id)
                return 200, "application/json", body, [(b"etag", f'"{etag}"'.encode())]
            page = await asyncio.to_thread(_view_page, directory, run_id)
        except RlmError as exc:
            return 404, "text/plain; charset=utf-8", str(exc).encode(), []
        return 200, "text/html; charset=utf-8", page, []


# Blocking (file reads, JSON of up to a few MB): called in a thread.

def _view_json(directory: Path, run_id: str) -> tuple[bytes, str]:
    view = build_view(directory, run_id)
    return json.dumps(view, ensure_ascii=False).encode(), view["etag"]


def _view_page(directory: Path, run_id: str) -> bytes:
    return render_html(build_view(directory, run_id), data_url=f"{PREFIX}/{run_id}/view.json").encode()


async def _send(send: Any, status: int, content_type: str, body: bytes,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
               *_HEADERS, *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _page(title: str, body: str) -> bytes:
    style = ("body{font:14px/1.5 system-ui,sans-serif;margin:2em;color:#222;background:#fff}"
             "@media (prefers-color-scheme: dark){body{color:#ddd;background:#161616}a{color:#8ab4f8}}"
             "table{border-collapse:collapse}td,th{padding:.3em .8em;text-align:left;border-bottom:1px solid #8884}"
             "td.n{text-align:right;font-variant-numeric:tabular-nums}code,.mono{font-family:ui-monospace,monospace}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
            f"content=\"default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'\">"
            f"<meta name='viewport' content='width=device-width'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>").encode()


def _list_page(summaries: list[dict[str, Any]]) -> bytes:
    rows = []
    for run in summaries:
        cost = f"${run['cost_usd']:.4f}" if run.get("cost_usd") is not None else ""
        elapsed = f"{run['elapsed_s']:.1f} s" if run.get("elapsed_s") is not None else ""
        run_id = html.escape(run["run_id"])
        rows.append(f"<tr><td class='mono'><a href='{PREFIX}/{run_id}'>{run_id}</a></td>"
                    f"<td>{html.escape(run['status'])}</td><td>{html.escape(run['query'])}</td>"
                    f"<td>{html.escape(run.get('started_at') or '')}</td><td class='n'>{elapsed}</td>"
                    f"<td class='n'>{cost}</td></tr>")
    table = ("<table><thead><tr><th>run</th><th>status</th><th>query</th><th>started</th><th>elapsed</th>"
             f"<th>cost</th></tr></thead><tbody>{''.join(rows)}</tbody></table>") if rows else \
        "<p>No runs yet: start one with rlm_complete.</p>"
    return _page("rlm-mcp runs", f"<h1>Runs</h1>{table}")


def view_links(view_base: str | None, run_id: str) -> dict[str, str]:
    """Where a person sees a run: the served page (HTTP transports) or the command (stdio)."""
    if view_base is not None:
        return {"view_url": f"{view_base}{PREFIX}/{run_id}"}
    return {"view_command": f"rlm-mcp view {run_id}"}


def view_base_url(host: str, port: int) -> str:
    """The base URL people reach a server bound to ``host`` with (a wildcard bind: this machine's name)."""
    import socket

    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()  # not getfqdn(): no DNS lookup that could stall the start
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
