"""Fetching a context from an http(s) URL, safely. The only module that imports httpx.

Every address a host name resolves to is checked *before* connecting, and the connection is
then pinned to a checked address (Host header and TLS SNI keep the original name), so a DNS
answer that changes between the check and the connect cannot reach a private address.
Redirects are followed by hand, each hop checked the same way. The body is streamed in chunks
with a byte cap and one overall deadline; the caller (the store) decodes and stores it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from rlm_mcp.config import Settings
from rlm_mcp.errors import ContextError

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CHUNK_SIZE = 1 << 20

# Makes the httpx transport of one load (a fresh one each time: a client closes its transport).
# None: httpx's default. Tests pass one that trusts a test CA, or an httpx.MockTransport.
TransportFactory = Callable[[], httpx.AsyncBaseTransport]
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_TEXT_TYPES = (
    "application/json", "application/xml", "application/javascript", "application/ecmascript",
    "application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines",
    "application/yaml", "application/x-yaml", "application/toml", "application/csv",
    "application/sql", "application/graphql", "application/x-sh", "application/x-httpd-php",
    "application/xhtml+xml", "application/rss+xml", "application/atom+xml", "application/ld+json",
    "application/x-tex", "application/rtf", "application/x-subrip", "image/svg+xml",
)
# Served for raw files by many hosts; the store's binary sniffing decides.
_SNIFF_TYPES = ("", "application/octet-stream", "binary/octet-stream", "application/unknown")


@dataclass
class UrlBody:
    """An open 2xx response: what the store needs to decode and keep it."""

    url: str                 # final URL after redirects, without any user:password
    content_type: str        # media type, lower case, no parameters ("" if none was sent)
    charset: str | None      # from the Content-Type header, if any
    length: int | None       # Content-Length, if sent and the body is not content-encoded
    chunks: AsyncIterator[bytes]


def redact(url: str) -> str:
    """The URL without user:password, fit for logs, metadata and error messages."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<unparseable URL>"
    return str(parsed.copy_with(userinfo=b"")) if parsed.userinfo else str(parsed)


def default_name(url: str) -> str:
    """A short name for a context loaded from ``url``: its last path segment, else its host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return url
    tail = parsed.path.rstrip("/").rsplit("/", 1)[-1]
    return tail or parsed.host or url


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why fetching from ``ip`` is refused when private URLs are not allowed, or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return address_refusal(mapped)
    for label, flag in (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified),
                        ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                        ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if flag:
            return label
    if not ip.is_global:
        return "non-public"
    return None


async def _checked_addresses(host: str, port: int, allow_private: bool, shown: str) -> list[str]:
    """Resolve ``host`` and return its addresses, refusing if any of them is not public."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ContextError(f"cannot resolve the host of {shown} ({exc}): check the URL's spelling, "
                           "or download the file yourself and load it with path") from None
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]
        if address not in addresses:
            addresses.append(address)
    if not allow_private:
        for address in addresses:
            reason = address_refusal(ipaddress.ip_address(address))
            if reason:
                raise ContextError(
                    f"refusing to fetch {shown}: {host} resolves to {address}, a {reason} address. "
                    "Only public addresses are fetched; for a local or intranet document, save it "
                    "to a file and load it with path, or have the server operator set "
                    "RLM_MCP_ALLOW_PRIVATE_URLS=true")
    if not addresses:
        raise ContextError(f"{host} has no addresses: check the URL {shown}")
    return addresses


def _parse(url: str, shown: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ContextError(f"not a valid URL: {shown} ({exc}); pass a full http:// or https:// URL") from None
    if parsed.scheme not in ("http", "https"):
        raise ContextError(f"only http:// and https:// URLs can be loaded, not {parsed.scheme or 'a bare'}"
                           f" URL ({shown}); for a local file pass it as path instead")
    if not parsed.host:
        raise ContextError(f"the URL {shown} has no host: pass a full URL like https://example.com/file.txt")
    return parsed


async def _send(client: httpx.AsyncClient, target: httpx.URL, settings: Settings) -> httpx.Response:
    """GET ``target`` through one of its checked addresses (streamed response)."""
    shown = redact(str(target))
    port = target.port or (443 if target.scheme == "https" else 80)
    addresses = await _checked_addresses(target.host, port, settings.allow_private_urls, shown)
    host_header = target.netloc.decode("ascii")
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    # Credentials travel as an auth header, never in the URL, so httpx's own logs cannot show them.
    auth = httpx.BasicAuth(target.username, target.password) if target.userinfo else None
    failure: Exception | None = None
    for address in addresses:
        request = client.build_request("GET", target.copy_with(host=address, userinfo=b""),
                                       headers={"Host": host_header}, extensions=extensions)
        try:
            return await client.send(request, stream=True, auth=auth)
        except httpx.ConnectError as exc:
            failure = exc
    raise ContextError(f"cannot connect to {shown} ({failure}): check that the server is up "
                       "and reachable from the rlm-mcp server")


async def _body(response: httpx.Response, limit: int, shown: str) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in response.aiter_bytes(CHUNK_SIZE):
        received += len(chunk)
        if received > limit:
            raise ContextError(
                f"{shown} sent more than {limit:,} bytes, the size limit for a context; nothing was "
                "stored. Pass a larger max_bytes (up to the server's RLM_MCP_MAX_CONTEXT_BYTES), or "
                "download the file and load a part of it with path")
        yield chunk


def _media_type(response: httpx.Response) -> tuple[str, str | None]:
    header = response.headers.get("content-type", "")
    media, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip("\"'")
    return media.strip().lower(), charset


def _check_text_type(media: str, shown: str) -> None:
    if (media.startswith("text/") or media in _TEXT_TYPES or media in _SNIFF_TYPES
            or media.endswith(("+json", "+xml"))):
        return
    raise ContextError(
        f"{shown} is {media}, not text, so it cannot be loaded as a context. Download it, convert "
        "it to text (for example pdftotext for a PDF), and load the text file with path")


@asynccontextmanager
async def open_url(url: str, *, settings: Settings, max_bytes: int,
                   transport: TransportFactory | None = None) -> AsyncIterator[UrlBody]:
    """Open ``url`` for streaming; everything inside the ``async with`` shares one deadline of
    ``settings.url_timeout_s`` seconds. Raises ContextError for anything the caller must fix.
    ``transport`` makes the httpx transport (default: httpx's own, with its certificate checks)."""
    shown = redact(url)
    target = _parse(url, shown)
    timeout = httpx.Timeout(settings.url_timeout_s)
    try:
        async with asyncio.timeout(settings.url_timeout_s):
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                                         headers={"User-Agent": "rlm-mcp"},
                                         transport=transport() if transport is not None else None) as client:
                for _hop in range(MAX_REDIRECTS + 1):
                    response = await _send(client, target, settings)
                    try:
                        if response.status_code in _REDIRECT_CODES and "location" in response.headers:
                            location = response.headers["location"]
                            log.info("redirect %s -> %s", redact(str(target)), redact(location))
                            try:
                                joined = str(target.join(location))
                            except (httpx.InvalidURL, TypeError):
                                raise ContextError(f"{shown} redirected to an invalid URL "
                                                   f"({redact(location)}): pass another URL") from None
                            target = _parse(joined, redact(joined))
                            shown = redact(str(target))
                            continue
                        if not 200 <= response.status_code < 300:
                            raise ContextError(
                                f"{shown} answered HTTP {response.status_code} {response.reason_phrase}: "
                                "check the URL, or that the document is public (no login needed)")
                        media, charset = _media_type(response)
                        _check_text_type(media, shown)
                        length = None
                        if "content-encoding" not in response.headers:
                            try:
                                length = int(response.headers.get("content-length", ""))
                            except ValueError:
                                length = None
                        if length is not None and length > max_bytes:
                            raise ContextError(
                                f"{shown} is {length:,} bytes, over the {max_bytes:,}-byte limit for a "
                                "context; nothing was fetched. Pass a larger max_bytes (up to the "
                                "server's RLM_MCP_MAX_CONTEXT_BYTES), or download the file and load a "
                                "part of it with path")
                        log.info("fetching %s (%s, %s bytes)", shown, media or "no type", length)
                        yield UrlBody(shown, media, charset, length, _body(response, max_bytes, shown))
                        return
                    finally:
                        await response.aclose()
                raise ContextError(f"{redact(url)} redirected more than {MAX_REDIRECTS} times: "
                                   "pass the final URL directly")
    except (TimeoutError, httpx.TimeoutException):
        raise ContextError(
            f"fetching {shown} took longer than {settings.url_timeout_s:g} s and was stopped; nothing "
            "was stored. The server is slow or the body is large: retry, raise RLM_MCP_URL_TIMEOUT_S, "
            "or download the file and load it with path") from None
    except httpx.HTTPError as exc:
        raise ContextError(f"fetching {shown} failed: {type(exc).__name__}: {exc}. Retry, or download "
                           "the file and load it with path") from None
