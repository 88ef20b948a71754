"""Streaming text I/O for the context store: decoding with counted replacements, binary sniffing,
atomic temp-directory writers with a sparse character index, and index-guided slicing.

Internal to :mod:`rlm_mcp.store`. Step sizes come in a :class:`ChunkSizes` the store is built
with (tests shrink them to reach every boundary).
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from rlm_mcp.errors import ContextError, describe_os_error
from rlm_mcp.private import open_private, private_dir
from rlm_mcp.sandbox.base import ContextKind

PREVIEW_CHARS = 300
BINARY_REPLACED_RATIO = 0.15    # more invalid sequences per byte than this: binary
TMP_PREFIX = ".tmp-"

_ACTIVE_TMP: set[str] = set()   # temp dirs of loads in progress in this process (any store)
_ACTIVE_LOCK = threading.Lock()
_TLS = threading.local()


@dataclass(frozen=True)
class ChunkSizes:
    """The store's streaming step sizes (a constructor parameter of the store)."""

    read: int = 1 << 20               # bytes read (or characters written) per step
    index_interval: int = 1_000_000   # characters between sparse-index entries (char -> byte offset)
    peek_block: int = 1 << 16         # bytes read per step when reading stored text back
    sniff: int = 8192                 # bytes inspected to tell text from binary


def load_in_progress(directory: Path) -> bool:
    """True while a :class:`ContentWriter` of this process still owns ``directory``."""
    with _ACTIVE_LOCK:
        return str(directory) in _ACTIVE_TMP


def _count_replacement(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _TLS.replaced = getattr(_TLS, "replaced", 0) + 1
    return "\ufffd", exc.end


codecs.register_error("rlm_mcp.replace", _count_replacement)


class Decoder:
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


def pick_encoding(head: bytes, declared: str | None) -> tuple[str, str | None]:
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


def binary_reason(head: bytes, encoding: str) -> str | None:
    """Why ``head`` looks like binary data rather than text, or None."""
    if not head:
        return None
    if not encoding.startswith(("utf-16", "utf-32")) and b"\x00" in head:
        return "it contains NUL bytes"
    probe = Decoder(encoding)
    probe.decode(head)
    if probe.replaced > BINARY_REPLACED_RATIO * len(head):
        return f"most of it is not valid {encoding.upper()}"
    return None


def read_at_least(read: Callable[[int], bytes], size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        block = read(size - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


class ByteBudget:
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


class ContentWriter:
    """Streams one context into a fresh temp directory inside the store root."""

    def __init__(self, root: Path, kind: ContextKind, sizes: ChunkSizes = ChunkSizes()) -> None:
        self.kind = kind
        self.sizes = sizes
        self.dir = root / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        with _ACTIVE_LOCK:
            _ACTIVE_TMP.add(str(self.dir))
        self.file_name = "content.txt" if kind == "text" else "content.jsonl"
        self._fh: BinaryIO | None = None
        try:
            private_dir(self.dir)
            self._fh = cast(BinaryIO, open_private(self.dir / self.file_name, "wb"))
        except OSError as exc:
            self.discard()
            raise self._failed(exc) from None
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

    def _failed(self, exc: OSError) -> ContextError:
        """A write error (a full disk, usually) as a message that says what to do."""
        return ContextError(describe_os_error(exc, "storing the context", self.dir.parent))

    def _write(self, data: bytes) -> None:
        assert self._fh is not None
        try:
            self._fh.write(data)
        except OSError as exc:
            raise self._failed(exc) from None
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
            if self.chars - self._mark >= self.sizes.index_interval:
                self.index.append([self.chars, self.bytes])
                self._mark = self.chars
            self._write(utf8 if utf8 is not None else text.encode("utf-8", "replace"))
        else:
            doc = self._doc
            if doc["chars"] - doc["mark"] >= self.sizes.index_interval:
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
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        except OSError as exc:
            raise self._failed(exc) from None
        self._fh = None
        return self._sha.hexdigest()

    def write_json(self, name: str, data: object) -> None:
        try:
            with open_private(self.dir / name) as fh:
                json.dump(data, fh, ensure_ascii=False)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise self._failed(exc) from None

    def discard(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass  # the buffered tail could not be written (a full disk): it is deleted anyway
            self._fh = None
        shutil.rmtree(self.dir, ignore_errors=True)
        self.placed()

    def placed(self) -> None:
        """The temp directory was renamed into place (or removed): no load owns it any more."""
        with _ACTIVE_LOCK:
            _ACTIVE_TMP.discard(str(self.dir))


class Feed:
    """Decodes a byte stream into a writer; the first bytes decide the codec and whether it is
    binary (then ``refuse_binary`` builds the error)."""

    def __init__(self, writer: ContentWriter, budget: ByteBudget, refuse_binary: Callable[[str], str],
                 declared: str | None = None) -> None:
        self.writer = writer
        self.budget = budget
        self.refuse_binary = refuse_binary
        self.declared = declared
        self.head = bytearray()
        self.decoder: Decoder | None = None

    def push(self, chunk: bytes) -> None:
        self.budget.take(len(chunk))
        if self.decoder is not None:
            self.writer.text(*self.decoder.decode_exact(chunk))
            return
        self.head += chunk
        if len(self.head) >= self.writer.sizes.sniff:
            self._start()

    def _start(self) -> None:
        head = bytes(self.head)
        self.head = bytearray()
        encoding, note = pick_encoding(head, self.declared)
        reason = binary_reason(head, encoding)
        if reason:
            raise ContextError(self.refuse_binary(reason))
        if note:
            self.writer.encoding_notes.add(note)
        self.decoder = Decoder(encoding)
        self.writer.text(*self.decoder.decode_exact(head))

    def close(self) -> None:
        if self.decoder is None:
            self._start()
        assert self.decoder is not None
        self.writer.text(*self.decoder.decode_exact(b"", final=True))
        self.writer.replaced += self.decoder.replaced


# ----- reading back ---------------------------------------------------------------------------


def escape_cut(buf: str) -> int:
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


def iter_chars(fh: BinaryIO, offset: int, escaped: bool, stop: int | None, *, block: int) -> Iterator[str]:
    """The stored text from byte ``offset`` on (up to byte ``stop``), JSON-unescaped if asked,
    read ``block`` bytes at a time."""
    fh.seek(offset)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    position = offset
    while True:
        size = block if stop is None else min(block, stop - position)
        data = fh.read(size) if size > 0 else b""
        position += len(data)
        text = decoder.decode(data, final=not data)
        if escaped:
            buf = pending + text
            cut = len(buf) if not data else escape_cut(buf)
            pending = buf[cut:]
            text = json.loads('"' + buf[:cut] + '"') if cut else ""
        if text:
            yield text
        if not data:
            return


def read_slice(fh: BinaryIO, index: list[list[int]], start: int, count: int, *, block: int,
               escaped: bool = False, stop: int | None = None) -> str:
    """``count`` characters from char ``start``, seeking via the sparse (char, byte) index."""
    if count <= 0:
        return ""
    chars = [entry[0] for entry in index]
    char0, byte0 = index[bisect.bisect_right(chars, start) - 1]
    skip = start - char0
    pieces: list[str] = []
    for text in iter_chars(fh, byte0, escaped, stop, block=block):
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
