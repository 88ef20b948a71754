"""Loading contexts from URLs against real local HTTP servers, and refusing private addresses."""

from __future__ import annotations

import base64
import functools
import gzip
import ipaddress
import logging
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from rlm_mcp.config import Settings
from rlm_mcp.errors import ContextError
from rlm_mcp.store import ContextStore, urlfetch
from tests.support import unavailable

Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Server:
    host: str
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"


@contextmanager
def serve(host: str, tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    """A stdlib HTTP(S) server in a thread that records every request it gets."""
    state = Server(host, 0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            state.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            route = state.routes.get(self.path.split("?")[0])
            if route is None:
                self.send_error(404, "Not Found")
                return
            route(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer((host, 0), Handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[Server]:
    with serve("127.0.0.1") as state:
        yield state


def reply(body: bytes, content_type: str | None = "text/plain; charset=utf-8", status: int = 200,
          headers: dict[str, str] | None = None, length: bool = True) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        if content_type:
            handler.send_header("Content-Type", content_type)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(body)
    return route


def redirect(location: str, status: int = 302) -> Route:
    return reply(b"", status=status, headers={"Location": location})


def make_store(tmp_path: Path, *, url_transport: urlfetch.TransportFactory | None = None,
               **overrides: object) -> ContextStore:
    settings = {"allow_private_urls": True, "url_timeout_s": 10.0, **overrides}
    return ContextStore(Settings(home=tmp_path / "home", **settings), url_transport=url_transport)  # type: ignore[arg-type]


def assert_nothing_stored(store: ContextStore) -> None:
    assert store.list() == []
    assert list(store.root.iterdir()) == []


async def test_load_text_url(tmp_path: Path, server: Server) -> None:
    body = "line one\r\nline two \u00e9\U0001f600\n".encode()
    server.routes["/docs/notes.txt"] = reply(body)
    store = make_store(tmp_path)
    info = await store.load_url(server.url("/docs/notes.txt"))
    assert (info.kind, info.name, info.source) == ("text", "notes.txt", server.url("/docs/notes.txt"))
    assert store.context_file(info.handle).path.read_bytes() == body
    assert info.characters == len(body.decode()) and not info.decoding_replaced
    again = await store.load_url(server.url("/docs/notes.txt"), name="again")
    assert again.handle == info.handle and store.get(info.handle).aliases == ["again"]


async def test_charset_and_text_like_types(tmp_path: Path, server: Server) -> None:
    server.routes["/latin"] = reply("caf\u00e9".encode("latin-1"), "text/plain; charset=ISO-8859-1")
    server.routes["/data.json"] = reply(b'{"a": "\xc3\xa9"}', "application/json")
    server.routes["/feed"] = reply(b"<feed/>", "application/atom+xml")
    server.routes["/raw"] = reply(b"plain bytes", None)
    server.routes["/bad-utf8"] = reply(b"ok \xff\xfe then more text to read", "text/plain")
    store = make_store(tmp_path)
    latin = await store.load_url(server.url("/latin"))
    assert store.peek(latin.handle).text == "caf\u00e9" and any("iso8859-1" in n for n in latin.notes)
    assert store.peek((await store.load_url(server.url("/data.json"))).handle).text == '{"a": "\u00e9"}'
    assert store.peek((await store.load_url(server.url("/feed"))).handle).text == "<feed/>"
    assert store.peek((await store.load_url(server.url("/raw"))).handle).text == "plain bytes"
    bad = await store.load_url(server.url("/bad-utf8"))
    assert bad.decoding_replaced and store.peek(bad.handle).text.startswith("ok \ufffd")


async def test_binary_content_refused(tmp_path: Path, server: Server) -> None:
    server.routes["/logo.png"] = reply(b"\x89PNG\r\n", "image/png")
    server.routes["/blob"] = reply(b"\x00\x01\x02" * 100, "application/octet-stream")
    store = make_store(tmp_path)
    with pytest.raises(ContextError, match="is image/png, not text.*load the text file with path"):
        await store.load_url(server.url("/logo.png"))
    with pytest.raises(ContextError, match="looks binary \\(it contains NUL bytes\\)"):
        await store.load_url(server.url("/blob"))
    assert_nothing_stored(store)


async def test_http_error_status(tmp_path: Path, server: Server) -> None:
    store = make_store(tmp_path)
    with pytest.raises(ContextError, match="answered HTTP 404 Not Found: check the URL"):
        await store.load_url(server.url("/missing"))
    assert_nothing_stored(store)


async def test_redirects_followed_and_limited(tmp_path: Path, server: Server) -> None:
    server.routes["/final"] = reply(b"arrived")
    server.routes["/hop1"] = redirect("/hop2", 301)
    server.routes["/hop2"] = redirect(server.url("/final"), 307)
    for number in range(7):
        server.routes[f"/loop{number}"] = redirect(f"/loop{number + 1}")
    store = make_store(tmp_path)
    info = await store.load_url(server.url("/hop1"))
    assert store.peek(info.handle).text == "arrived" and info.source == server.url("/final")
    server.routes["/to-ftp"] = redirect("ftp://example.com/file.txt")
    with pytest.raises(ContextError, match="only http:// and https:// URLs can be loaded"):
        await store.load_url(server.url("/to-ftp"))
    with pytest.raises(ContextError, match="redirected more than 5 times: pass the final URL"):
        await store.load_url(server.url("/loop0"))
    assert [path for path, _ in server.requests][-6:] == [f"/loop{n}" for n in range(6)]


async def test_oversized_body_is_cut(tmp_path: Path, server: Server) -> None:
    server.routes["/declared"] = reply(b"a" * 10_000)
    server.routes["/undeclared"] = reply(b"b" * 10_000, length=False)  # HTTP/1.0: ends at close
    server.routes["/bomb"] = reply(gzip.compress(b"c" * 100_000), headers={"Content-Encoding": "gzip"})
    store = make_store(tmp_path)
    with pytest.raises(ContextError, match="is 10,000 bytes, over the 4,096-byte limit.*nothing was fetched"):
        await store.load_url(server.url("/declared"), max_bytes=4096)
    for path in ("/undeclared", "/bomb"):
        with pytest.raises(ContextError, match="sent more than 4,096 bytes.*nothing was stored"):
            await store.load_url(server.url(path), max_bytes=4096)
    assert_nothing_stored(store)
    assert store.peek((await store.load_url(server.url("/bomb"))).handle, 0, 5).text == "ccccc"


async def test_timeout(tmp_path: Path, server: Server) -> None:
    def stall(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.end_headers()
        handler.wfile.write(b"partial")
        handler.wfile.flush()
        server.release.wait(timeout=30)   # released when the test's server shuts down

    server.routes["/slow"] = stall
    store = make_store(tmp_path, url_timeout_s=0.5)
    with pytest.raises(ContextError, match="took longer than 0.5 s and was stopped; nothing was stored"):
        await store.load_url(server.url("/slow"))
    assert_nothing_stored(store)


@pytest.mark.parametrize("host, kind", [
    ("127.0.0.1", "loopback"), ("localhost", "loopback"), ("[::1]", "loopback"),
    ("10.0.0.1", "private"), ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"),
    ("[::ffff:127.0.0.1]", "loopback"), ("224.0.0.1", "multicast"),
])
async def test_private_addresses_refused_before_connecting(tmp_path: Path, server: Server, host: str,
                                                           kind: str) -> None:
    server.routes["/secret"] = reply(b"internal")
    store = make_store(tmp_path, allow_private_urls=False, url_timeout_s=30.0)
    with pytest.raises(ContextError, match=f"refusing to fetch .*a {kind} address.*RLM_MCP_ALLOW_PRIVATE_URLS"):
        await store.load_url(f"http://{host}:{server.port}/secret")
    assert server.requests == []
    assert_nothing_stored(store)


@pytest.fixture
def second_server() -> Iterator[Server]:
    with serve("127.0.0.2") as state:
        yield state


async def test_redirect_to_private_address_refused(tmp_path: Path, server: Server, second_server: Server,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real_policy = urlfetch.address_refusal
    public_stand_in = ipaddress.ip_address("127.0.0.1")   # plays a public host in this test
    monkeypatch.setattr(urlfetch, "address_refusal",
                        lambda ip: None if ip == public_stand_in else real_policy(ip))
    second_server.routes["/admin"] = reply(b"internal")
    server.routes["/to-private"] = redirect(second_server.url("/admin"))
    server.routes["/to-metadata"] = redirect("http://169.254.169.254/latest/meta-data/")
    server.routes["/public"] = reply(b"public text")
    store = make_store(tmp_path, allow_private_urls=False)
    assert store.peek((await store.load_url(server.url("/public"))).handle).text == "public text"
    with pytest.raises(ContextError, match="127.0.0.2 resolves to 127.0.0.2, a loopback address"):
        await store.load_url(server.url("/to-private"))
    with pytest.raises(ContextError, match="169.254.169.254, a link-local address"):
        await store.load_url(server.url("/to-metadata"))
    assert second_server.requests == []
    assert [path for path, _ in server.requests] == ["/public", "/to-private", "/to-metadata"]


async def test_connection_pinned_to_checked_address(tmp_path: Path, server: Server) -> None:
    server.routes["/pin"] = reply(b"pinned")
    store = make_store(tmp_path)
    info = await store.load_url(f"http://localhost:{server.port}/pin")
    assert store.peek(info.handle).text == "pinned"
    assert server.requests[-1][1]["host"] == f"localhost:{server.port}"


async def test_userinfo_used_but_never_shown(tmp_path: Path, server: Server,
                                            caplog: pytest.LogCaptureFixture) -> None:
    server.routes["/private.txt"] = reply(b"members only")
    store = make_store(tmp_path)
    caplog.set_level(logging.DEBUG)
    url = f"http://alice:s3cret@127.0.0.1:{server.port}/private.txt"
    info = await store.load_url(url)
    assert server.requests[-1][1]["authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert info.source == server.url("/private.txt")
    with pytest.raises(ContextError) as caught:
        await store.load_url(f"http://alice:s3cret@127.0.0.1:{server.port}/nope")
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in caplog.text and "s3cret" not in str(store.list())


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com/file.txt", "only http:// and https:// URLs"),
    ("file:///etc/passwd", "only http:// and https:// URLs"),
    ("http:///nohost", "has no host"),
    ("http://no-such-host.invalid/x", "cannot resolve the host"),
])
async def test_bad_urls(tmp_path: Path, url: str, message: str) -> None:
    store = make_store(tmp_path)
    with pytest.raises(ContextError, match=message):
        await store.load_url(url)
    assert_nothing_stored(store)


@pytest.mark.parametrize("address, reason", [
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("100.64.0.1", "non-public"),
    ("192.168.1.1", "private"), ("fe80::1", "link-local"), ("::", "unspecified"),
    ("2002:7f00:0001::", "loopback"), ("240.0.0.1", "reserved"), ("fd00::1", "private"),
])
def test_address_policy(address: str, reason: str | None) -> None:
    assert urlfetch.address_refusal(ipaddress.ip_address(address)) == reason


async def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]     # nothing listens here once the socket is closed
    store = make_store(tmp_path)
    with pytest.raises(ContextError, match="cannot connect to .*check that the server is up"):
        await store.load_url(f"http://127.0.0.1:{port}/x")
    assert_nothing_stored(store)


@pytest.mark.parametrize("cert_name, ok", [("localhost", True), ("elsewhere.example", False)])
async def test_https_pinned_address_keeps_certificate_checks(tmp_path: Path, cert_name: str, ok: bool) -> None:
    """The connection goes to the checked IP, yet TLS still verifies the URL's host name."""
    if shutil.which("openssl") is None:
        unavailable("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={cert_name}", "-addext", f"subjectAltName=DNS:{cert_name}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    trusting_the_test_ca = ssl.create_default_context(cafile=str(cert))
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(str(cert), str(key))
    with serve("127.0.0.1", server_tls) as state:
        state.routes["/secure.txt"] = reply(b"over tls")
        # The store's transport seam: httpx's own transport, trusting only the test certificate.
        store = make_store(tmp_path, url_transport=functools.partial(httpx.AsyncHTTPTransport, verify=trusting_the_test_ca))
        url = f"https://localhost:{state.port}/secure.txt"
        if ok:
            assert store.peek((await store.load_url(url)).handle).text == "over tls"
            assert state.requests[-1][1]["host"] == f"localhost:{state.port}"
        else:
            with pytest.raises(ContextError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
                await store.load_url(url)
            assert_nothing_stored(store)
