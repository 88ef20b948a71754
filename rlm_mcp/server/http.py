"""The HTTP side of the server (sse and streamable HTTP): bearer-token auth, the token file,
Host/Origin checks for loopback binds, and clean-up at shutdown."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from rlm_mcp.config import Settings
from rlm_mcp.errors import ConfigError
from rlm_mcp.private import private_dir, write_private_text
from rlm_mcp.server.pages import RunPages
from rlm_mcp.services import Services

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


class BearerAuth:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, supplied = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(supplied.strip(), self.token):
                body = (b'{"error": "missing or wrong bearer token: send Authorization: Bearer <token>, where the '
                        b'token is RLM_MCP_AUTH_TOKEN or the one the server printed at start and wrote to its '
                        b'token file"}')
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class HttpAuth:
    """How an HTTP server checks its clients: a bearer token (given or generated), or none."""

    token: str | None
    token_file: Path | None = None  # where a generated token was written

    @property
    def generated(self) -> bool:
        return self.token_file is not None


def token_file_path(settings: Settings, port: int) -> Path:
    """Where an HTTP server on ``port`` writes the token it generated."""
    return Path(settings.home).expanduser() / f"http-{port}.token"


def http_auth(settings: Settings, host: str, port: int) -> HttpAuth:
    """The token rule, as in Jupyter: a token always, generated when none is given; no token
    only when asked explicitly, and only on loopback (any local user could reach it, but no one
    else)."""
    if settings.no_auth:
        if settings.auth_token:
            raise ConfigError("RLM_MCP_AUTH_TOKEN is set and --no-auth (or RLM_MCP_NO_AUTH) asks for no token: "
                              "drop one of the two")
        if not is_loopback(host):
            raise ConfigError(f"refusing --no-auth (RLM_MCP_NO_AUTH) on {host}, which is not a loopback address: "
                              "anyone who can reach it could read files as this server's user. Serve without "
                              "--no-auth (a token is then generated, or set RLM_MCP_AUTH_TOKEN), or bind 127.0.0.1")
        return HttpAuth(None)
    if settings.auth_token:
        return HttpAuth(settings.auth_token)
    token = secrets.token_urlsafe(32)
    path = token_file_path(settings, port)
    private_dir(path.parent, tighten=False)
    write_private_text(path, token + "\n")
    return HttpAuth(token, path)


def forget_generated_token(auth: HttpAuth) -> None:
    """Remove the token file at shutdown (unless a newer server on the port rewrote it)."""
    if auth.token_file is None:
        return
    with contextlib.suppress(OSError):
        if auth.token_file.read_text(encoding="utf-8").strip() == auth.token:
            auth.token_file.unlink()


def announce(transport: str, host: str, port: int, auth: HttpAuth) -> str:
    """What the operator needs to connect, printed to stderr at start."""
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}{'/sse' if transport == 'sse' else '/mcp'}"
    name = "SSE" if transport == "sse" else "streamable HTTP"
    lines = [f"rlm-mcp: serving MCP ({name}) at {url}"]
    runs = f"http://{shown_host}:{port}/runs"
    if auth.token is None:
        lines.append(f"rlm-mcp: runs viewer at {runs}")
        lines.append("rlm-mcp: WARNING: no token (--no-auth): every local user can use this server, "
                     "and read any file it can read")
        return "\n".join(lines) + "\n"
    if auth.generated:
        lines.append(f"rlm-mcp: token (new at each start; also in {auth.token_file}, readable only by this user): "
                     f"{auth.token}")
        header = f"Authorization: Bearer {auth.token}"
    else:
        lines.append("rlm-mcp: token: the value of RLM_MCP_AUTH_TOKEN")
        header = "Authorization: Bearer $RLM_MCP_AUTH_TOKEN"
    lines.append(f"rlm-mcp: send it with every request as the header  {header}")
    lines.append(f"rlm-mcp: runs viewer at {runs}?token={auth.token if auth.generated else '$RLM_MCP_AUTH_TOKEN'} "
                 "(once per browser: a cookie keeps you in)")
    lines.append(f"rlm-mcp: e.g. claude mcp add --transport {'sse' if transport == 'sse' else 'http'} rlm {url} "
                 f"--header \"{header}\"")
    return "\n".join(lines) + "\n"


def host_names(host: str) -> set[str] | None:
    """The Host names a loopback bind answers to (None for other binds: any name reaches them)."""
    if not is_loopback(host):
        return None
    return {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}


def host_checker(host: str) -> Callable[[str], bool] | None:
    """A check of a request's Host header against :func:`host_names` (None: no check)."""
    names = host_names(host)
    if names is None:
        return None

    def allowed(header: str) -> bool:
        name = header[:header.index("]") + 1] if header.startswith("[") and "]" in header else header.rsplit(":", 1)[0]
        return name.lower() in names
    return allowed


def http_app(server: MCPServer, transport: str, host: str, auth: HttpAuth,
             services: Services | None = None, port: int | None = None) -> Any:
    """The Starlette app for sse/http, with the bind rules applied; with ``services`` and
    ``port``, the run viewer's pages (``/runs``) too, behind the same walls."""
    names = host_names(host)
    if names is not None:
        # The SDK turns DNS-rebinding protection on by itself only for the exact names
        # 127.0.0.1 / localhost / ::1; any loopback bind (127.0.0.2, ...) gets it explicitly.
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{name}:*" for name in sorted(names)],
            allowed_origins=[f"http://{name}:*" for name in sorted(names)])
    else:
        # Host names cannot be known for a public bind; the bearer token is what protects it.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if transport == "sse":
        app = server.sse_app(transport_security=security, host=host)
    else:
        app = server.streamable_http_app(transport_security=security, host=host)
    served: Any = BearerAuth(app, auth.token) if auth.token else app
    if services is not None and port is not None:
        served = RunPages(served, services, token=auth.token, port=port, host_allowed=host_checker(host))
    return served


class OnShutdown:
    """ASGI wrapper running ``cleanup`` when the app shuts down, before it reports so: uvicorn
    re-raises SIGTERM/SIGINT right after its shutdown, so code after ``serve()`` never runs then."""

    def __init__(self, app: Any, cleanup: Callable[[], Awaitable[None]]) -> None:
        self.app = app
        self.cleanup = cleanup

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_after_cleanup(message: dict[str, Any]) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.cleanup()
            await send(message)

        await self.app(scope, receive, send_after_cleanup)
