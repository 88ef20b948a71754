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

Modules: this front (load, get, list, delete, peek), ``layout`` (the handle directories: commit,
metadata, aliases, clean-up), ``paths`` (allowed roots, safe open), ``io`` (streaming, decoding,
the character index), ``scan`` (directories), ``urlfetch`` (URLs), ``models`` (what is reported).

Loading is blocking file I/O: async callers should run ``load_path``, ``load_stream`` and
``combine`` in a worker thread (``asyncio.to_thread``); ``load_url`` is async itself.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins  # `list` in this module's class is ContextStore.list
import hashlib
import logging
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from rlm_mcp.config import Settings
from rlm_mcp.errors import ContextError, quoted
from rlm_mcp.private import private_dir
from rlm_mcp.sandbox.base import ContextFile, ContextKind
from rlm_mcp.store import urlfetch
from rlm_mcp.store.io import (
    ByteBudget, ChunkSizes, ContentWriter, Feed, binary_reason, iter_chars, pick_encoding, read_at_least, read_slice)
from rlm_mcp.store.layout import StoreLayout
from rlm_mcp.store.models import ContextInfo, ContextPage, handle_for
from rlm_mcp.store.paths import HostFiles, allowed_roots, open_regular, resolve_local
from rlm_mcp.store.scan import DirectoryScan, skip_notes

log = logging.getLogger(__name__)

PEEK_MAX = 20_000
LISTED_LENGTHS = 20
SHOWN_PATH_CHARS = 300     # longer paths are cut in messages (an input can be megabytes)

class ContextStore:
    """Content-addressed contexts under ``settings.home / "contexts"``.

    The seams a caller (or a test) may set: ``sizes`` (streaming step sizes), ``files`` (the
    open and rename calls, see :class:`HostFiles`) and ``url_transport`` (a factory of the httpx
    transport URL loads go through, e.g. one trusting a test CA, or ``httpx.MockTransport``)."""

    def __init__(self, settings: Settings, *, sizes: ChunkSizes = ChunkSizes(), files: HostFiles | None = None,
                 url_transport: urlfetch.TransportFactory | None = None) -> None:
        self.settings = settings
        self.sizes = sizes
        self.files = files or HostFiles()
        self.url_transport = url_transport
        home = Path(settings.home).expanduser()
        private_dir(home, tighten=False)  # 0700 when created here; a chosen existing dir is left as is
        self.root = private_dir(home / "contexts")
        self.layout = StoreLayout(self.root, self.files)
        self.layout.clean_leftovers()

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
        writer = self._writer("text")
        step = self.sizes.read
        try:
            for i in range(0, len(text), step):
                writer.text(text[i:i + step])
        except BaseException:
            writer.discard()
            raise
        writer.replaced = replaced
        return self._commit(writer, name=name or "inline text", source="inline text", notes=notes)

    def load_path(self, path: str, *, name: str | None = None, include: list[str] | None = None,
                  exclude: list[str] | None = None, max_bytes: int | None = None) -> ContextInfo:
        """Store a text file (kind "text") or a directory tree (kind "documents")."""
        if not isinstance(path, str):
            raise ContextError(f"path must be a string, got {quoted(path)}")
        plain = len(path) <= SHOWN_PATH_CHARS and path.isprintable()
        shown = path if plain else quoted(path, SHOWN_PATH_CHARS)
        resolved = resolve_local(path, shown, self._roots())
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
        fh = open_regular(resolved, shown, self._roots(), self.files)
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
        """Fetch an http(s) URL (see :mod:`rlm_mcp.store.urlfetch`) and store the body as text."""
        limit = self._limit(max_bytes)
        shown = urlfetch.redact(url)
        writer = self._writer("text")
        try:
            async with urlfetch.open_url(url, settings=self.settings, max_bytes=limit,
                                         transport=self.url_transport) as body:
                shown = body.url
                feed = Feed(writer, ByteBudget(limit, lambda cap: self._too_big(shown, "sent more bytes", cap, max_bytes)),
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
        writer = self._writer("documents")
        block = self.sizes.peek_block
        try:
            for info in infos:
                content = self.layout.content(info.handle, self.layout.meta(info.handle))
                with open(content, "rb") as fh:
                    if info.kind == "text":
                        writer.begin_document(info.name)
                        for text in iter_chars(fh, 0, False, None, block=block):
                            writer.text(text)
                        writer.end_document()
                        continue
                    for doc in self.layout.documents(info.handle):
                        writer.begin_document(f"{info.name}/{doc['path']}")
                        for text in iter_chars(fh, doc["start"], True, doc["end"], block=block):
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
        return ContextInfo.model_validate(self.layout.meta(handle)["info"])

    def list(self) -> list[ContextInfo]:
        """All stored contexts, oldest first."""
        return sorted(self.layout.infos(), key=lambda info: (info.created_at, info.handle))

    def delete(self, handle: str) -> ContextInfo:
        """Remove a context; returns what it was."""
        info = self.get(handle)
        self.layout.delete(handle)
        log.info("deleted context %s (%s)", handle, info.name)
        return info

    def context_file(self, handle: str) -> ContextFile:
        """Where the content is on disk and its kind, for a sandbox to load."""
        meta = self.layout.meta(handle)
        return ContextFile(path=self.layout.content(handle, meta), kind=meta["info"]["kind"])

    def verify(self, handle: str) -> None:
        """Raise ContextError unless the stored content still has the sha256 it was loaded with.

        Blocking, and about 0.6-0.9 s per GB here (hashing runs at memory speed with SHA-NI);
        run it in a thread. The handle is re-derived too, so editing ``meta.json`` to match
        altered content is caught as well."""
        meta = self.layout.meta(handle)
        info = ContextInfo.model_validate(meta["info"])
        path = self.layout.content(handle, meta)
        try:
            with open(path, "rb") as fh:
                sha = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise ContextError(f"cannot read context {handle} ({info.name}): {exc.strerror}; delete it with "
                               "rlm_delete_context and load the input again") from None
        if sha != info.sha256 or handle_for(info.kind, sha) != handle:
            raise ContextError(
                f"context {handle} ({info.name}) was changed on disk after it was loaded (its sha256 is now "
                f"{sha[:16]}..., not {info.sha256[:16]}...), so it was not used: delete it with "
                "rlm_delete_context and load the input again")

    def peek(self, handle: str, start: int = 0, length: int = 2000,
             document: int | None = None) -> ContextPage:
        """Characters ``[start, start+length)`` (length capped at 20,000) of a text context, of one
        document, or of the documents view ``"=== path ===\\n" + text + "\\n"`` per document."""
        meta = self.layout.meta(handle)
        info = ContextInfo.model_validate(meta["info"])
        if start < 0 or length < 1:
            raise ContextError(f"peek needs start >= 0 and length >= 1, got start={start}, length={length}")
        length = min(length, PEEK_MAX)
        content = self.layout.content(handle, meta)
        block = self.sizes.peek_block
        if info.kind == "text":
            if document is not None:
                raise ContextError(f"{handle} is a text context with no documents: peek it without document")
            self._check_start(handle, start, info.characters)
            end = min(info.characters, start + length)
            with open(content, "rb") as fh:
                text = read_slice(fh, [[0, 0]] + meta["index"], start, end - start, block=block)
            return ContextPage(handle=handle, start=start, end=end, total=info.characters, text=text,
                               next_start=end if end < info.characters else None)
        docs = self.layout.documents(handle)
        if document is not None:
            if not 0 <= document < len(docs):
                raise ContextError(f"{handle} has {len(docs):,} documents, numbered 0 to {len(docs) - 1:,}; "
                                   f"there is no document {document}")
            doc = docs[document]
            self._check_start(handle, start, doc["chars"])
            end = min(doc["chars"], start + length)
            with open(content, "rb") as fh:
                text = read_slice(fh, [[0, doc["start"]]] + doc["index"], start, end - start, block=block,
                                  escaped=True, stop=doc["end"])
            return ContextPage(handle=handle, start=start, end=end, total=doc["chars"], text=text,
                               next_start=end if end < doc["chars"] else None,
                               document=document, document_path=doc["path"])
        return self._peek_view(handle, content, docs, start, length)

    # ----- internals --------------------------------------------------------------------------

    def _peek_view(self, handle: str, content: Path, docs: builtins.list[dict[str, Any]], start: int,
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
                            pieces.append(read_slice(fh, [[0, doc["start"]]] + doc["index"], lo - offset,
                                                     hi - lo, block=self.sizes.peek_block, escaped=True, stop=doc["end"]))
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

    def _roots(self) -> builtins.list[Path]:
        return allowed_roots(self.settings)

    def _writer(self, kind: ContextKind) -> ContentWriter:
        return ContentWriter(self.root, kind, self.sizes)

    def _load_stream(self, stream: BinaryIO, *, kind_shown: str, name: str, source: str, limit: int,
                     max_bytes: int | None, notes: builtins.list[str]) -> ContextInfo:
        writer = self._writer("text")
        try:
            feed = Feed(writer, ByteBudget(limit, lambda cap: self._too_big(kind_shown, "is larger", cap, max_bytes)),
                        lambda reason: self._binary_message(kind_shown, reason))
            while chunk := stream.read(self.sizes.read):
                feed.push(chunk)
            feed.close()
        except OSError as exc:
            writer.discard()
            raise ContextError(f"reading {kind_shown} failed: {exc.strerror or exc}; retry, or copy it to a local "
                               "file") from None
        except BaseException:
            writer.discard()
            raise
        return self._commit(writer, name=name, source=source, notes=notes)

    def _load_directory(self, root: Path, shown: str, name: str, include: builtins.list[str],
                        exclude: builtins.list[str], limit: int, max_bytes: int | None) -> ContextInfo:
        max_files = self.settings.max_files
        scan = DirectoryScan(root, include, exclude, self._roots(), stop_after=max_files * 2 + 1000)
        if not scan.files:
            why = "; ".join(skip_notes(scan.skipped)) or "it is empty"
            raise ContextError(f"{shown} has no files to load ({why}): check the include/exclude "
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
        budget = ByteBudget(limit, lambda cap: self._too_big(shown, "grew while loading", cap, max_bytes))
        writer = self._writer("documents")
        try:
            roots = self._roots()
            for rel, path in scan.files:
                try:
                    fh = open_regular(path, rel, roots, self.files)
                except ContextError:
                    skipped["unreadable"] += 1
                    continue
                with fh:
                    try:
                        head = read_at_least(fh.read, self.sizes.sniff)
                        if binary_reason(head, pick_encoding(head, None)[0]):
                            skipped["binary"] += 1
                            continue
                        writer.begin_document(rel)
                        feed = Feed(writer, budget, lambda reason: self._binary_message(rel, reason))
                        feed.push(head)
                        while chunk := fh.read(self.sizes.read):
                            feed.push(chunk)
                        feed.close()
                        writer.end_document()
                    except OSError as exc:
                        raise ContextError(f"reading {rel} in {shown} failed: {exc.strerror or exc}; retry, or "
                                           "exclude that file") from None
            if not writer.docs:
                raise ContextError(f"{shown} has no text files to load ({'; '.join(skip_notes(skipped))}): "
                                   "convert the files to text, or load another directory")
        except BaseException:
            writer.discard()
            raise
        return self._commit(writer, name=name, source=str(root), notes=skip_notes(skipped), skipped=skipped)

    def _commit(self, writer: ContentWriter, *, name: str, source: str, notes: builtins.list[str],
                skipped: dict[str, int] | None = None) -> ContextInfo:
        """Finish a load: write meta, rename the temp dir into place (or reuse an existing copy)."""
        try:
            sha = writer.close()
            handle = handle_for(writer.kind, sha)
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
            return self.layout.commit(writer, info)
        except BaseException:
            writer.discard()
            raise
