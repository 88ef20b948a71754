"""The context store: large inputs loaded once, kept on disk, handed to sandboxes by handle.

Layout: ``<home>/contexts/<handle>/`` holds the content (``content.txt``: UTF-8 text, or
``content.jsonl``: one ``{"path": ..., "text": ...}`` per line) and ``meta.json`` (plus
``documents.json``, the per-document table, for document contexts). The handle is
``"ctx_" + sha256(content)[:16]``, so the same content loaded twice is stored once; the first
name is kept and later names are recorded as aliases.

Every load streams into ``<root>/.tmp-<pid>-<random>/`` in ~1 MiB chunks (memory stays flat for
any size), fsyncs, then renames that directory into place: a handle either exists whole or not
at all. If two loads of the same content race, the loser discards its copy. Leftover temp
directories of dead processes are removed when a store starts.

Caps are refused, never truncated: a directory or stream over ``max_files`` / the byte cap
raises :class:`ContextError` with the counts and how to narrow the load, and stores nothing.
A partially loaded context could silently lose the part that holds the answer.

Loading is blocking file I/O: async callers should run ``load_path``, ``load_stream`` and
``combine`` in a worker thread (``asyncio.to_thread``); ``load_url`` is async itself.
"""

from __future__ import annotations

import asyncio
import bisect
import codecs
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

import pydantic

from rlm_mcp import urlfetch
from rlm_mcp.config import Settings
from rlm_mcp.errors import ContextError
from rlm_mcp.sandbox.base import ContextFile, ContextKind

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20            # bytes read (or characters written) per step
INDEX_INTERVAL = 1_000_000      # characters between sparse-index entries (char -> byte offset)
PREVIEW_CHARS = 300
SNIFF_BYTES = 8192              # bytes inspected to tell text from binary
BINARY_REPLACED_RATIO = 0.15    # more invalid sequences per byte than this: binary
PEEK_MAX = 20_000
PEEK_BLOCK = 1 << 16
LISTED_LENGTHS = 20
STALE_TMP_S = 24 * 3600
IGNORED_DIRS = frozenset({
    ".git", ".hg", ".svn", ".bzr", "node_modules", "bower_components", "__pycache__", ".venv",
    "venv", ".tox", ".nox", "dist", "build", ".mypy_cache", ".pytest_cache", ".ruff_cache",
    ".idea", ".vscode", ".gradle", ".next", ".nuxt", ".terraform", ".eggs", ".cache",
})
IGNORED_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
# Files that usually hold credentials: a directory load would send them to the model provider.
SECRET_FILES = (".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_dsa*", "id_ecdsa*",
                "id_ed25519*", ".netrc", ".pgpass", ".npmrc", ".pypirc", "*.keystore", "credentials")
SKIP_KEYS = ("binary", "ignored_dir", "ignored_file", "secret", "excluded", "symlink", "outside_roots",
             "special", "unreadable", "over_file_cap", "over_byte_cap")

_HANDLE_RE = re.compile(r"ctx_[0-9a-f]{16}")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_ACTIVE_TMP: set[str] = set()   # temp dirs of loads in progress in this process
_ACTIVE_LOCK = threading.Lock()
_META_LOCK = threading.Lock()     # serialises alias updates of meta.json in this process
_TLS = threading.local()


def _count_replacement(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _TLS.replaced = getattr(_TLS, "replaced", 0) + 1
    return "\ufffd", exc.end


codecs.register_error("rlm_mcp.replace", _count_replacement)


class ContextInfo(pydantic.BaseModel):
    """What the tools report about a stored context."""

    handle: str
    name: str
    kind: Literal["text", "documents"]
    characters: int
    bytes: int
    documents: int
    document_lengths: list[int]
    sha256: str
    preview: str
    source: str
    created_at: str
    skipped: dict[str, int]
    decoding_replaced: bool
    notes: list[str]
    aliases: list[str] = []


class ContextPage(pydantic.BaseModel):
    """A window of a context's text, for peeking without running a model."""

    handle: str
    start: int
    end: int
    total: int
    text: str
    next_start: int | None
    document: int | None = None
    document_path: str | None = None


# ----- decoding -------------------------------------------------------------------------------


class _Decoder:
    """Incremental decoder that replaces invalid input with U+FFFD and counts how often."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="rlm_mcp.replace")
        self.replaced = 0

    def decode(self, data: bytes, final: bool = False) -> str:
        _TLS.replaced = 0
        text = self._decoder.decode(data, final)
        self.replaced += _TLS.replaced
        return text

    def decode_exact(self, data: bytes, final: bool = False) -> tuple[str, bytes | None]:
        """Decode, and also return the input bytes the text came from when they are exactly its
        UTF-8 encoding (valid UTF-8 input), so the writer can skip re-encoding."""
        if self.encoding != "utf-8":
            return self.decode(data, final), None
        held = self._decoder.getstate()[0]
        before = self.replaced
        text = self.decode(data, final)
        if self.replaced != before:
            return text, None
        consumed = held + data if held else data
        rest = len(self._decoder.getstate()[0])
        return text, consumed[:len(consumed) - rest] if rest else consumed


def _pick_encoding(head: bytes, declared: str | None) -> tuple[str, str | None]:
    """The codec for a stream starting with ``head``, and a note if it is not plain UTF-8."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32", "decoded from UTF-32 (byte order mark found)"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", "decoded from UTF-16 (byte order mark found)"
    if declared:
        try:
            name = codecs.lookup(declared).name
        except LookupError:
            return "utf-8", f"unknown charset {declared!r} declared; decoded as UTF-8"
        if name != "utf-8":
            return name, f"decoded from the declared charset {name}"
    return "utf-8", None


def _binary_reason(head: bytes, encoding: str) -> str | None:
    """Why ``head`` looks like binary data rather than text, or None."""
    if not head:
        return None
    if not encoding.startswith(("utf-16", "utf-32")) and b"\x00" in head:
        return "it contains NUL bytes"
    probe = _Decoder(encoding)
    probe.decode(head)
    if probe.replaced > BINARY_REPLACED_RATIO * len(head):
        return f"most of it is not valid {encoding.upper()}"
    return None


def _read_at_least(read: Callable[[int], bytes], size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        block = read(size - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


class _Budget:
    """Counts input bytes; raises the caller's ContextError once over the limit."""

    def __init__(self, limit: int, refuse: Callable[[int], str]) -> None:
        self.limit = limit
        self.used = 0
        self._refuse = refuse

    def take(self, count: int) -> None:
        self.used += count
        if self.used > self.limit:
            raise ContextError(self._refuse(self.limit))


# ----- writing --------------------------------------------------------------------------------


class _Writer:
    """Streams one context into a fresh temp directory inside the store root."""

    def __init__(self, root: Path, kind: ContextKind) -> None:
        self.kind = kind
        self.dir = root / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        with _ACTIVE_LOCK:
            _ACTIVE_TMP.add(str(self.dir))
        self.dir.mkdir()
        self.file_name = "content.txt" if kind == "text" else "content.jsonl"
        self._fh: BinaryIO | None = open(self.dir / self.file_name, "wb")
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.chars = 0
        self.index: list[list[int]] = []
        self.docs: list[dict[str, Any]] = []
        self.replaced = 0
        self.encoding_notes: set[str] = set()
        self._mark = 0
        self._doc: dict[str, Any] | None = None
        self._preview: list[str] = []
        self._preview_len = 0

    def _write(self, data: bytes) -> None:
        assert self._fh is not None
        self._fh.write(data)
        self._sha.update(data)
        self.bytes += len(data)

    def _show(self, text: str) -> None:
        room = PREVIEW_CHARS - self._preview_len
        if room > 0 and text:
            self._preview.append(text[:room])
            self._preview_len += len(self._preview[-1])

    @property
    def preview(self) -> str:
        return "".join(self._preview)

    def text(self, text: str, utf8: bytes | None = None) -> None:
        """Append text (to the open document, for a documents context); ``utf8``, if given, is
        exactly ``text.encode("utf-8")``."""
        if not text:
            return
        self._show(text)
        if self._doc is None:
            if self.kind != "text":
                raise RuntimeError("text written outside a document")
            if self.chars - self._mark >= INDEX_INTERVAL:
                self.index.append([self.chars, self.bytes])
                self._mark = self.chars
            self._write(utf8 if utf8 is not None else text.encode("utf-8", "replace"))
        else:
            doc = self._doc
            if doc["chars"] - doc["mark"] >= INDEX_INTERVAL:
                doc["index"].append([doc["chars"], self.bytes])
                doc["mark"] = doc["chars"]
            self._write(json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8", "replace"))
            doc["chars"] += len(text)
        self.chars += len(text)

    def begin_document(self, path: str) -> None:
        self._write(b'{"path": ' + json.dumps(path, ensure_ascii=False).encode("utf-8", "replace")
                    + b', "text": "')
        self._show(f"=== {path} ===\n")
        self._doc = {"path": path, "chars": 0, "start": self.bytes, "end": 0, "index": [], "mark": 0}

    def end_document(self) -> None:
        assert self._doc is not None
        self._doc["end"] = self.bytes
        del self._doc["mark"]
        self.docs.append(self._doc)
        self._doc = None
        self._write(b'"}\n')
        self._show("\n")

    def close(self) -> str:
        """Flush and fsync the content; return its sha256."""
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        return self._sha.hexdigest()

    def write_json(self, name: str, data: object) -> None:
        with open(self.dir / name, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self.dir, ignore_errors=True)
        with _ACTIVE_LOCK:
            _ACTIVE_TMP.discard(str(self.dir))


class _Feed:
    """Decodes a byte stream into a writer; the first bytes decide the codec and whether it is
    binary (then ``refuse_binary`` builds the error)."""

    def __init__(self, writer: _Writer, budget: _Budget, refuse_binary: Callable[[str], str],
                 declared: str | None = None) -> None:
        self.writer = writer
        self.budget = budget
        self.refuse_binary = refuse_binary
        self.declared = declared
        self.head = bytearray()
        self.decoder: _Decoder | None = None

    def push(self, chunk: bytes) -> None:
        self.budget.take(len(chunk))
        if self.decoder is not None:
            self.writer.text(*self.decoder.decode_exact(chunk))
            return
        self.head += chunk
        if len(self.head) >= SNIFF_BYTES:
            self._start()

    def _start(self) -> None:
        head = bytes(self.head)
        self.head = bytearray()
        encoding, note = _pick_encoding(head, self.declared)
        reason = _binary_reason(head, encoding)
        if reason:
            raise ContextError(self.refuse_binary(reason))
        if note:
            self.writer.encoding_notes.add(note)
        self.decoder = _Decoder(encoding)
        self.writer.text(*self.decoder.decode_exact(head))

    def close(self) -> None:
        if self.decoder is None:
            self._start()
        assert self.decoder is not None
        self.writer.text(*self.decoder.decode_exact(b"", final=True))
        self.writer.replaced += self.decoder.replaced


# ----- reading back ---------------------------------------------------------------------------


def _escape_cut(buf: str) -> int:
    """Length of the longest prefix of JSON-escaped ``buf`` that ends on a whole escape."""
    k = buf.rfind("\\", max(0, len(buf) - 6))
    if k < 0:
        return len(buf)
    j = k
    while j >= 0 and buf[j] == "\\":
        j -= 1
    if (k - j) % 2 == 0:
        return len(buf)
    if k + 1 == len(buf):
        return k
    need = 6 if buf[k + 1] == "u" else 2
    return len(buf) if len(buf) - k >= need else k


def _iter_chars(fh: BinaryIO, offset: int, escaped: bool, stop: int | None) -> Iterator[str]:
    """The stored text from byte ``offset`` on (up to byte ``stop``), JSON-unescaped if asked."""
    fh.seek(offset)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    position = offset
    while True:
        size = PEEK_BLOCK if stop is None else min(PEEK_BLOCK, stop - position)
        block = fh.read(size) if size > 0 else b""
        position += len(block)
        text = decoder.decode(block, final=not block)
        if escaped:
            buf = pending + text
            cut = len(buf) if not block else _escape_cut(buf)
            pending = buf[cut:]
            text = json.loads('"' + buf[:cut] + '"') if cut else ""
        if text:
            yield text
        if not block:
            return


def _read_slice(fh: BinaryIO, index: list[list[int]], start: int, count: int, *,
                escaped: bool = False, stop: int | None = None) -> str:
    """``count`` characters from char ``start``, seeking via the sparse (char, byte) index."""
    if count <= 0:
        return ""
    chars = [entry[0] for entry in index]
    char0, byte0 = index[bisect.bisect_right(chars, start) - 1]
    skip = start - char0
    pieces: list[str] = []
    for text in _iter_chars(fh, byte0, escaped, stop):
        if skip:
            if len(text) <= skip:
                skip -= len(text)
                continue
            text, skip = text[skip:], 0
        pieces.append(text[:count])
        count -= len(pieces[-1])
        if count <= 0:
            break
    return "".join(pieces)


# ----- directory scanning ---------------------------------------------------------------------


def _matches(rel: str, patterns: list[str]) -> bool:
    """gitignore-like: a pattern without "/" matches any path component (``*.py``, ``tests``);
    one with "/" matches the relative path or one of its parent directories (``docs/**``).
    Matching is ``fnmatch`` on posix paths, so ``*`` also matches "/" (``src/*.py`` takes
    ``src/a/b.py`` too)."""
    parts = rel.split("/")
    for raw in patterns:
        pattern = raw.strip().removeprefix("./")
        if not pattern:
            continue
        if "/" not in pattern.rstrip("/"):
            name = pattern.rstrip("/")
            if any(fnmatch.fnmatchcase(part, name) for part in parts):
                return True
            continue
        if fnmatch.fnmatchcase(rel, pattern):
            return True
        base = pattern.rstrip("/").removesuffix("/**").rstrip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), base) for i in range(1, len(parts) + 1)):
            return True
    return False


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _count(number: int, word: str, plural: str | None = None) -> str:
    return f"{number:,} {word if number == 1 else plural or word + 's'}"


def _human(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"


class _Scan:
    """The files of a directory tree that a load would include, with what was skipped."""

    def __init__(self, root: Path, include: list[str], exclude: list[str], roots: list[Path],
                 stop_after: int) -> None:
        self.files: list[tuple[str, Path]] = []
        self.total = 0
        self.incomplete = False
        self.skipped = {key: 0 for key in SKIP_KEYS}
        self.parts: dict[str, list[int]] = {}
        stack = [(root, "")]
        while stack and not self.incomplete:
            directory, prefix = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                self.skipped["unreadable"] += 1
                continue
            for entry in entries:
                rel = prefix + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name in IGNORED_DIRS or entry.name.endswith(".egg-info"):
                            self.skipped["ignored_dir"] += 1
                        elif exclude and _matches(rel, exclude):
                            self.skipped["excluded"] += 1
                        else:
                            stack.append((Path(entry.path), rel + "/"))
                        continue
                    size = self._file_size(entry, roots)
                except OSError:
                    self.skipped["unreadable"] += 1
                    continue
                if size is None:
                    continue
                if entry.name in IGNORED_FILES:
                    self.skipped["ignored_file"] += 1
                elif any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in SECRET_FILES):
                    self.skipped["secret"] += 1
                elif (include and not _matches(rel, include)) or (exclude and _matches(rel, exclude)):
                    self.skipped["excluded"] += 1
                else:
                    self.files.append((rel, Path(entry.path)))
                    self.total += size
                    part = self.parts.setdefault(rel.split("/")[0] + ("/" if "/" in rel else ""), [0, 0])
                    part[0] += 1
                    part[1] += size
                    if len(self.files) >= stop_after:
                        self.incomplete = True
                        break
        self.files.sort()

    def _file_size(self, entry: os.DirEntry[str], roots: list[Path]) -> int | None:
        """Size of a loadable file entry, or None (counted as skipped)."""
        if entry.is_symlink():
            try:
                target = Path(entry.path).resolve(strict=True)
                info = target.stat()
            except (OSError, RuntimeError):
                self.skipped["symlink"] += 1
                return None
            if stat.S_ISDIR(info.st_mode):
                self.skipped["symlink"] += 1     # symlinked directories are never followed
                return None
            if roots and not _inside(target, roots):
                self.skipped["outside_roots"] += 1
                return None
        else:
            info = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            self.skipped["special"] += 1
            return None
        return info.st_size

    def largest_parts(self, count: int = 5) -> str:
        ranked = sorted(self.parts.items(), key=lambda item: -item[1][1])[:count]
        return ", ".join(f"{name} ({_count(files, 'file')}, {_human(size)})" for name, (files, size) in ranked)


def _skip_notes(skipped: dict[str, int]) -> list[str]:
    words = {
        "binary": ("binary file", "skipped"),
        "ignored_dir": ("directory", "skipped by name (.git, node_modules, build, ...; load one by "
                        "its own path to include it)"),
        "ignored_file": ("system file", "skipped (.DS_Store, ...)"),
        "secret": ("likely secret file", "skipped (.env, *.pem, *.key, id_rsa, ...; load one by its "
                   "own path to include it)"),
        "excluded": ("file or directory", "left out by include/exclude"),
        "symlink": ("symlink", "skipped (symlinked directories are not followed; broken links)"),
        "outside_roots": ("symlink", "skipped: pointing outside the allowed roots"),
        "special": ("special file", "skipped (devices, FIFOs, sockets)"),
        "unreadable": ("unreadable file or directory", "skipped"),
    }
    plurals = {"directory": "directories", "file or directory": "files or directories",
               "unreadable file or directory": "unreadable files or directories"}
    return [f"{_count(skipped[key], word, plurals.get(word))} {text}"
            for key, (word, text) in words.items() if skipped.get(key)]


# ----- the store ------------------------------------------------------------------------------


class ContextStore:
    """Content-addressed contexts under ``settings.home / "contexts"``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.home).expanduser() / "contexts"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._documents_cache: dict[str, list[dict[str, Any]]] = {}
        self._clean_leftovers()

    # ----- loading ----------------------------------------------------------------------------

    def load_text(self, text: str, *, name: str | None = None) -> ContextInfo:
        """Store inline text; over ``max_inline_chars`` it must come as a file instead."""
        limit = self.settings.max_inline_chars
        if len(text) > limit:
            raise ContextError(
                f"the inline text is {len(text):,} characters, over the {limit:,}-character limit for "
                "inline contexts: save it to a file and load it with path instead")
        notes = []
        replaced = 0
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            before = text.count("\ufffd")
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            replaced = text.count("\ufffd") - before
            notes.append("unpaired surrogate code points were replaced with U+FFFD")
        writer = _Writer(self.root, "text")
        try:
            for i in range(0, len(text), CHUNK_SIZE):
                writer.text(text[i:i + CHUNK_SIZE])
        except BaseException:
            writer.discard()
            raise
        writer.replaced = replaced
        return self._commit(writer, name=name or "inline text", source="inline text", notes=notes)

    def load_path(self, path: str, *, name: str | None = None, include: list[str] | None = None,
                  exclude: list[str] | None = None, max_bytes: int | None = None) -> ContextInfo:
        """Store a text file (kind "text") or a directory tree (kind "documents")."""
        shown = str(path)
        resolved = self._resolve_local(shown)
        limit = self._limit(max_bytes)
        try:
            mode = os.stat(resolved).st_mode
        except OSError as exc:
            raise ContextError(f"cannot read {shown}: {exc.strerror}; check the path and permissions") from None
        default_name = resolved.name or str(resolved)
        if isinstance(include, str):
            include = [include]
        if isinstance(exclude, str):
            exclude = [exclude]
        if stat.S_ISDIR(mode):
            return self._load_directory(resolved, shown, name or default_name, include or [],
                                        exclude or [], limit, max_bytes)
        fh = self._open_regular(resolved, shown)
        notes = ["include/exclude apply to directories only and were ignored"] if include or exclude else []
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise ContextError(self._too_big(shown, f"is {size:,} bytes", limit, max_bytes))
            return self._load_stream(fh, kind_shown=shown, name=name or default_name,
                                     source=str(resolved), limit=limit, max_bytes=max_bytes, notes=notes)

    def load_stream(self, stream: BinaryIO, *, name: str, source: str,
                    max_bytes: int | None = None) -> ContextInfo:
        """Store a byte stream (e.g. stdin) as text."""
        return self._load_stream(stream, kind_shown=source, name=name, source=source,
                                 limit=self._limit(max_bytes), max_bytes=max_bytes, notes=[])

    async def load_url(self, url: str, *, name: str | None = None,
                       max_bytes: int | None = None) -> ContextInfo:
        """Fetch an http(s) URL (see :mod:`rlm_mcp.urlfetch`) and store the body as text."""
        limit = self._limit(max_bytes)
        shown = urlfetch.redact(url)
        writer = _Writer(self.root, "text")
        try:
            async with urlfetch.open_url(url, settings=self.settings, max_bytes=limit) as body:
                shown = body.url
                feed = _Feed(writer, _Budget(limit, lambda cap: self._too_big(shown, "sent more bytes", cap, max_bytes)),
                             lambda reason: self._binary_message(shown, reason), body.charset)
                async for chunk in body.chunks:
                    feed.push(chunk)
                feed.close()
        except BaseException:
            writer.discard()
            raise
        return await asyncio.to_thread(self._commit, writer, name=name or urlfetch.default_name(shown),
                                       source=shown, notes=[])

    def combine(self, handles: list[str], *, name: str | None = None) -> ContextInfo:
        """One documents context from several handles: a text handle becomes one document named
        after it, a documents handle contributes each of its documents as ``<name>/<path>``."""
        if not handles:
            raise ContextError("combine needs at least one handle: call rlm_list_contexts to see them")
        infos = [self.get(handle) for handle in handles]
        total = sum(info.bytes for info in infos)
        count = sum(info.documents or 1 for info in infos)
        if total > self.settings.max_context_bytes or count > self.settings.max_files:
            raise ContextError(
                f"combining these {len(infos)} contexts gives {count:,} documents and {total:,} bytes, "
                f"over the limit of {self.settings.max_files:,} documents / "
                f"{self.settings.max_context_bytes:,} bytes: combine fewer handles")
        writer = _Writer(self.root, "documents")
        try:
            for info in infos:
                content = self._dir(info.handle) / self._meta(info.handle)["content"]
                with open(content, "rb") as fh:
                    if info.kind == "text":
                        writer.begin_document(info.name)
                        for text in _iter_chars(fh, 0, False, None):
                            writer.text(text)
                        writer.end_document()
                        continue
                    for doc in self._documents(info.handle):
                        writer.begin_document(f"{info.name}/{doc['path']}")
                        for text in _iter_chars(fh, doc["start"], True, doc["end"]):
                            writer.text(text)
                        writer.end_document()
        except BaseException:
            writer.discard()
            raise
        names = ", ".join(info.name for info in infos)
        return self._commit(writer, name=name or f"combined: {names}"[:200],
                            source="combined " + ", ".join(handles), notes=[])

    # ----- reading ----------------------------------------------------------------------------

    def get(self, handle: str) -> ContextInfo:
        """The stored context's info, or ContextError for an unknown handle."""
        return ContextInfo.model_validate(self._meta(handle)["info"])

    def list(self) -> list[ContextInfo]:
        """All stored contexts, oldest first."""
        infos = []
        for entry in sorted(os.listdir(self.root)):
            if _HANDLE_RE.fullmatch(entry):
                meta = self._read_meta(self.root / entry)
                if meta is not None:
                    infos.append(ContextInfo.model_validate(meta["info"]))
        return sorted(infos, key=lambda info: (info.created_at, info.handle))

    def delete(self, handle: str) -> ContextInfo:
        """Remove a context; returns what it was."""
        info = self.get(handle)
        trash = self.root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(self._dir(handle), trash)
        except FileNotFoundError:
            raise self._unknown(handle) from None
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._documents_cache.pop(handle, None)
        log.info("deleted context %s (%s)", handle, info.name)
        return info

    def context_file(self, handle: str) -> ContextFile:
        """Where the content is on disk and its kind, for a sandbox to load."""
        meta = self._meta(handle)
        return ContextFile(path=self._dir(handle) / meta["content"], kind=meta["info"]["kind"])

    def peek(self, handle: str, start: int = 0, length: int = 2000,
             document: int | None = None) -> ContextPage:
        """Characters ``[start, start+length)`` (length capped at 20,000) of a text context, of one
        document, or of the documents view ``"=== path ===\\n" + text + "\\n"`` per document."""
        meta = self._meta(handle)
        info = ContextInfo.model_validate(meta["info"])
        if start < 0 or length < 1:
            raise ContextError(f"peek needs start >= 0 and length >= 1, got start={start}, length={length}")
        length = min(length, PEEK_MAX)
        content = self._dir(handle) / meta["content"]
        if info.kind == "text":
            if document is not None:
                raise ContextError(f"{handle} is a text context with no documents: peek it without document")
            self._check_start(handle, start, info.characters)
            end = min(info.characters, start + length)
            with open(content, "rb") as fh:
                text = _read_slice(fh, [[0, 0]] + meta["index"], start, end - start)
            return ContextPage(handle=handle, start=start, end=end, total=info.characters, text=text,
                               next_start=end if end < info.characters else None)
        docs = self._documents(handle)
        if document is not None:
            if not 0 <= document < len(docs):
                raise ContextError(f"{handle} has {len(docs):,} documents, numbered 0 to {len(docs) - 1:,}; "
                                   f"there is no document {document}")
            doc = docs[document]
            self._check_start(handle, start, doc["chars"])
            end = min(doc["chars"], start + length)
            with open(content, "rb") as fh:
                text = _read_slice(fh, [[0, doc["start"]]] + doc["index"], start, end - start,
                                   escaped=True, stop=doc["end"])
            return ContextPage(handle=handle, start=start, end=end, total=doc["chars"], text=text,
                               next_start=end if end < doc["chars"] else None,
                               document=document, document_path=doc["path"])
        return self._peek_view(handle, content, docs, start, length)

    # ----- internals --------------------------------------------------------------------------

    def _peek_view(self, handle: str, content: Path, docs: list[dict[str, Any]], start: int,
                   length: int) -> ContextPage:
        starts, offset = [], 0
        for doc in docs:
            starts.append(offset)
            offset += len(f"=== {doc['path']} ===\n") + doc["chars"] + 1
        total = offset
        self._check_start(handle, start, total)
        end = min(total, start + length)
        first = max(0, bisect.bisect_right(starts, start) - 1)
        pieces: list[str] = []
        with open(content, "rb") as fh:
            for i in range(first, len(docs)):
                if starts[i] >= end:
                    break
                doc = docs[i]
                header = f"=== {doc['path']} ===\n"
                offset = starts[i]
                for segment, size in ((header, len(header)), (None, doc["chars"]), ("\n", 1)):
                    lo, hi = max(start, offset), min(end, offset + size)
                    if lo < hi:
                        if segment is None:
                            pieces.append(_read_slice(fh, [[0, doc["start"]]] + doc["index"], lo - offset,
                                                      hi - lo, escaped=True, stop=doc["end"]))
                        else:
                            pieces.append(segment[lo - offset:hi - offset])
                    offset += size
        current = docs[first] if docs else None
        return ContextPage(handle=handle, start=start, end=end, total=total, text="".join(pieces),
                           next_start=end if end < total else None,
                           document=first if current else None,
                           document_path=current["path"] if current else None)

    @staticmethod
    def _check_start(handle: str, start: int, total: int) -> None:
        if start > total:
            raise ContextError(f"start {start:,} is past the end of {handle} ({total:,} characters): "
                               f"use a start from 0 to {total:,}")

    def _limit(self, max_bytes: int | None) -> int:
        cap = self.settings.max_context_bytes
        if max_bytes is None:
            return cap
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ContextError(f"max_bytes must be a positive whole number of bytes, got {max_bytes!r}")
        return min(max_bytes, cap)

    def _too_big(self, shown: str, what: str, limit: int, max_bytes: int | None) -> str:
        cap = self.settings.max_context_bytes
        raise_hint = (f"pass a larger max_bytes (the server allows up to {cap:,})" if limit < cap
                      else "ask the operator to raise RLM_MCP_MAX_CONTEXT_BYTES")
        return (f"{shown} {what}, over the {limit:,}-byte limit for a context; nothing was stored. "
                f"Load a smaller part of it (split the file, or select with include/exclude for a "
                f"directory), or {raise_hint}")

    @staticmethod
    def _binary_message(shown: str, reason: str) -> str:
        return (f"{shown} looks binary ({reason}), so it was not loaded. Convert it to text first "
                "(e.g. pdftotext for a PDF, or iconv -t UTF-8 for text in another encoding) and load "
                "the text")

    def _roots(self) -> list[Path]:
        return [Path(root).expanduser().resolve() for root in self.settings.allowed_roots]

    def _resolve_local(self, shown: str) -> Path:
        if not shown.strip():
            raise ContextError("path is empty: pass the absolute path of a file or directory")
        path = Path(shown.strip()).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        try:
            resolved = path.resolve(strict=True)
        except FileNotFoundError:
            raise ContextError(
                f"no such file or directory: {shown} (relative paths are resolved against the server's "
                f"working directory, {Path.cwd()}): check the path, or pass an absolute one") from None
        except (OSError, RuntimeError) as exc:
            raise ContextError(f"cannot resolve {shown}: {exc}; pass the real path of the file") from None
        roots = self._roots()
        if roots and not _inside(resolved, roots):
            raise ContextError(
                f"{shown} resolves to {resolved}, outside the allowed roots "
                f"({', '.join(str(root) for root in roots)}): load a file inside one of them, or ask "
                "the operator to add its folder to RLM_MCP_ALLOWED_ROOTS")
        return resolved

    @staticmethod
    def _open_regular(resolved: Path, shown: str) -> BinaryIO:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(resolved, flags)
        except PermissionError:
            raise ContextError(f"cannot read {shown}: permission denied; make it readable by the user "
                               "running the rlm-mcp server, or copy it somewhere readable") from None
        except OSError as exc:
            raise ContextError(f"cannot open {shown}: {exc.strerror}; check the path") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ContextError(f"{shown} is not a regular file or directory (a device, FIFO or socket): "
                               "save its data to a regular file and load that")
        return os.fdopen(fd, "rb")

    def _load_stream(self, stream: BinaryIO, *, kind_shown: str, name: str, source: str, limit: int,
                     max_bytes: int | None, notes: list[str]) -> ContextInfo:
        writer = _Writer(self.root, "text")
        try:
            feed = _Feed(writer, _Budget(limit, lambda cap: self._too_big(kind_shown, "is larger", cap, max_bytes)),
                         lambda reason: self._binary_message(kind_shown, reason))
            while chunk := stream.read(CHUNK_SIZE):
                feed.push(chunk)
            feed.close()
        except OSError as exc:
            writer.discard()
            raise ContextError(f"reading {kind_shown} failed: {exc}; retry, or copy it to a local file") from None
        except BaseException:
            writer.discard()
            raise
        return self._commit(writer, name=name, source=source, notes=notes)

    def _load_directory(self, root: Path, shown: str, name: str, include: list[str],
                        exclude: list[str], limit: int, max_bytes: int | None) -> ContextInfo:
        max_files = self.settings.max_files
        scan = _Scan(root, include, exclude, self._roots(), stop_after=max_files * 2 + 1000)
        if not scan.files:
            skipped = "; ".join(_skip_notes(scan.skipped)) or "it is empty"
            raise ContextError(f"{shown} has no files to load ({skipped}): check the include/exclude "
                               "patterns, or load a directory that contains text files")
        if len(scan.files) > max_files or scan.total > limit:
            more = "more than " if scan.incomplete else ""
            raise ContextError(
                f"{shown} holds {more}{len(scan.files):,} files and {more}{scan.total:,} bytes to load, "
                f"over the limit of {max_files:,} files and {limit:,} bytes; nothing was loaded. Narrow "
                "it with include (e.g. ['*.py', 'docs/**']) or exclude (e.g. ['tests', '*.json']) "
                f"patterns, or load a subdirectory. Largest parts: {scan.largest_parts()}"
                + (f"; or pass a larger max_bytes (the server allows up to {self.settings.max_context_bytes:,})"
                   if limit < self.settings.max_context_bytes and scan.total > limit else ""))
        skipped = scan.skipped
        budget = _Budget(limit, lambda cap: self._too_big(shown, "grew while loading", cap, max_bytes))
        writer = _Writer(self.root, "documents")
        try:
            for rel, path in scan.files:
                try:
                    fh = self._open_regular(path, rel)
                except ContextError:
                    skipped["unreadable"] += 1
                    continue
                with fh:
                    try:
                        head = _read_at_least(fh.read, SNIFF_BYTES)
                        if _binary_reason(head, _pick_encoding(head, None)[0]):
                            skipped["binary"] += 1
                            continue
                        writer.begin_document(rel)
                        feed = _Feed(writer, budget, lambda reason: self._binary_message(rel, reason))
                        feed.push(head)
                        while chunk := fh.read(CHUNK_SIZE):
                            feed.push(chunk)
                        feed.close()
                        writer.end_document()
                    except OSError as exc:
                        raise ContextError(f"reading {rel} in {shown} failed: {exc}; retry, or exclude "
                                           "that file") from None
            if not writer.docs:
                raise ContextError(f"{shown} has no text files to load ({'; '.join(_skip_notes(skipped))}): "
                                   "convert the files to text, or load another directory")
        except BaseException:
            writer.discard()
            raise
        return self._commit(writer, name=name, source=str(root), notes=_skip_notes(skipped), skipped=skipped)

    def _commit(self, writer: _Writer, *, name: str, source: str, notes: list[str],
                skipped: dict[str, int] | None = None) -> ContextInfo:
        """Finish a load: write meta, rename the temp dir into place (or reuse an existing copy)."""
        try:
            sha = writer.close()
            handle = "ctx_" + sha[:16]
            notes = list(notes)
            notes.extend(sorted(writer.encoding_notes))
            if writer.replaced and not any("U+FFFD" in note for note in notes):
                notes.append(f"{writer.replaced:,} invalid byte sequences were replaced with U+FFFD "
                             "(the input was not valid UTF-8)")
            if writer.chars == 0:
                notes.append("the context is empty")
            info = ContextInfo(
                handle=handle, name=name, kind=writer.kind, characters=writer.chars, bytes=writer.bytes,
                documents=len(writer.docs), document_lengths=[d["chars"] for d in writer.docs[:LISTED_LENGTHS]],
                sha256=sha, preview=writer.preview, source=source,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                skipped=skipped or {}, decoding_replaced=writer.replaced > 0, notes=notes)
            if writer.kind == "documents":
                writer.write_json("documents.json", {"documents": writer.docs})
            writer.write_json("meta.json", {"format": 1, "content": writer.file_name,
                                            "index": writer.index, "info": info.model_dump()})
            target = self._dir(handle)
            for _attempt in range(3):
                if target.exists():     # renamed in whole, so meta.json is there unless damaged
                    existing = self._read_meta(target)
                    if existing is not None:
                        writer.discard()
                        return self._reuse(handle, existing, name)
                    self._set_aside(target)
                try:
                    os.rename(writer.dir, target)
                except OSError:
                    continue            # lost a race with a concurrent load of the same content
                with _ACTIVE_LOCK:
                    _ACTIVE_TMP.discard(str(writer.dir))
                self._fsync_dir(self.root)
                log.info("stored context %s (%s, %s, %s chars) from %s", handle, name, writer.kind,
                         f"{writer.chars:,}", source)
                return info
            raise ContextError(f"could not store the context in {self.root}: retry the load")
        except BaseException:
            writer.discard()
            raise

    def _set_aside(self, target: Path) -> None:
        """Remove a damaged handle directory (no readable meta.json) so a good copy can replace it."""
        trash = self.root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            return                      # deleted meanwhile
        log.warning("replacing damaged context directory %s", target)
        shutil.rmtree(trash, ignore_errors=True)

    def _reuse(self, handle: str, meta: dict[str, Any], name: str) -> ContextInfo:
        """The content is already stored: record ``name`` as an alias and return the original."""
        info = ContextInfo.model_validate(meta["info"])
        if name != info.name and name not in info.aliases:
            with _META_LOCK:
                fresh = self._read_meta(self._dir(handle))
                if fresh is not None:
                    fresh["info"]["aliases"] = list(fresh["info"].get("aliases", [])) + [name]
                    self._write_meta(self._dir(handle), fresh)
                    info = ContextInfo.model_validate(fresh["info"])
        reply = info.model_copy(deep=True)
        reply.notes.append(f"this content was already stored as {info.name!r}; the same handle is returned")
        return reply

    def _write_meta(self, directory: Path, meta: dict[str, Any]) -> None:
        temp = directory / f"meta.json.{uuid.uuid4().hex}.tmp"
        with open(temp, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, directory / "meta.json")

    def _dir(self, handle: str) -> Path:
        if not isinstance(handle, str) or not _HANDLE_RE.fullmatch(handle):
            raise self._unknown(handle)
        return self.root / handle

    @staticmethod
    def _unknown(handle: object) -> ContextError:
        return ContextError(f"unknown context handle {handle!r}: call rlm_list_contexts to see the "
                            "handles, or rlm_load_context to load one")

    @staticmethod
    def _read_meta(directory: Path) -> dict[str, Any] | None:
        try:
            with open(directory / "meta.json", encoding="utf-8") as fh:
                meta = json.load(fh)
            ContextInfo.model_validate(meta["info"])
            return meta
        except (OSError, ValueError, KeyError, TypeError, pydantic.ValidationError):
            return None

    def _meta(self, handle: str) -> dict[str, Any]:
        meta = self._read_meta(self._dir(handle))
        if meta is None:
            raise self._unknown(handle)
        return meta

    def _documents(self, handle: str) -> list[dict[str, Any]]:
        with self._lock:
            cached = self._documents_cache.get(handle)
        if cached is None:
            try:
                with open(self._dir(handle) / "documents.json", encoding="utf-8") as fh:
                    cached = json.load(fh)["documents"]
            except (OSError, ValueError, KeyError):
                raise self._unknown(handle) from None
            with self._lock:
                if len(self._documents_cache) >= 16:
                    self._documents_cache.clear()
                self._documents_cache[handle] = cached
        return cached

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return                      # not supported on this platform (Windows)
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _clean_leftovers(self) -> None:
        """Remove temp dirs of crashed loads and half-deleted handles."""
        for entry in os.listdir(self.root):
            path = self.root / entry
            if entry.startswith(_TRASH_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif entry.startswith(_TMP_PREFIX):
                with _ACTIVE_LOCK:
                    if str(path) in _ACTIVE_TMP:
                        continue
                pid_text = entry[len(_TMP_PREFIX):].split("-", 1)[0]
                pid = int(pid_text) if pid_text.isdigit() else -1
                try:
                    stale = time.time() - path.stat().st_mtime > STALE_TMP_S
                except OSError:
                    continue
                if pid == os.getpid() or not _pid_alive(pid) or stale:
                    log.info("removing leftover temp dir %s", path)
                    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":
        return True                     # os.kill would terminate it; rely on the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
