"""The store's on-disk layout: ``<root>/<handle>/`` with the content, ``meta.json`` and (for
document contexts) ``documents.json``; committing a finished load into place, aliases,
deletion, and the clean-up of what crashed loads left behind."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pydantic

from rlm_mcp.errors import ContextError, quoted
from rlm_mcp.private import write_private_text
from rlm_mcp.sandbox.processes import pid_alive
from rlm_mcp.store.io import TMP_PREFIX, ContentWriter, load_in_progress
from rlm_mcp.store.models import HANDLE_RE, ContextInfo
from rlm_mcp.store.paths import HostFiles

log = logging.getLogger(__name__)

STALE_TMP_S = 24 * 3600
TRASH_PREFIX = ".trash-"
DOCUMENTS_CACHED = 16              # document tables kept in memory per store
_META_LOCK = threading.Lock()      # serialises alias updates of meta.json in this process


class StoreLayout:
    """The handle directories under ``root``; every rename goes through ``files``."""

    def __init__(self, root: Path, files: HostFiles) -> None:
        self.root = root
        self.files = files
        self._lock = threading.Lock()
        self._documents_cache: dict[str, list[dict[str, Any]]] = {}

    # ----- reading ------------------------------------------------------------------------------

    def dir(self, handle: str) -> Path:
        if not isinstance(handle, str) or not HANDLE_RE.fullmatch(handle):
            raise self.unknown(handle)
        return self.root / handle

    @staticmethod
    def unknown(handle: object) -> ContextError:
        return ContextError(f"unknown context handle {quoted(handle)}: call rlm_list_contexts to see the "
                            "handles, or rlm_load_context to load one")

    @staticmethod
    def read_meta(directory: Path) -> dict[str, Any] | None:
        """``meta.json`` of a handle directory, or None when missing or damaged."""
        try:
            with open(directory / "meta.json", encoding="utf-8") as fh:
                meta = json.load(fh)
            ContextInfo.model_validate(meta["info"])
            return meta
        except (OSError, ValueError, KeyError, TypeError, pydantic.ValidationError):
            return None

    def meta(self, handle: str) -> dict[str, Any]:
        meta = self.read_meta(self.dir(handle))
        if meta is None:
            raise self.unknown(handle)
        return meta

    def content(self, handle: str, meta: dict[str, Any]) -> Path:
        return self.dir(handle) / meta["content"]

    def infos(self) -> list[ContextInfo]:
        """Every readable context, in directory order."""
        infos = []
        for entry in sorted(os.listdir(self.root)):
            if HANDLE_RE.fullmatch(entry):
                meta = self.read_meta(self.root / entry)
                if meta is not None:
                    infos.append(ContextInfo.model_validate(meta["info"]))
        return infos

    def documents(self, handle: str) -> list[dict[str, Any]]:
        """The per-document table of a documents context (a few are cached)."""
        with self._lock:
            cached = self._documents_cache.get(handle)
        if cached is None:
            try:
                with open(self.dir(handle) / "documents.json", encoding="utf-8") as fh:
                    cached = json.load(fh)["documents"]
            except (OSError, ValueError, KeyError):
                raise self.unknown(handle) from None
            with self._lock:
                if len(self._documents_cache) >= DOCUMENTS_CACHED:
                    self._documents_cache.clear()
                self._documents_cache[handle] = cached
        return cached

    # ----- writing ------------------------------------------------------------------------------

    def commit(self, writer: ContentWriter, info: ContextInfo) -> ContextInfo:
        """Write the metadata and rename the writer's temp directory into place, or, when the
        content is stored already, discard it and record ``info.name`` as an alias."""
        if writer.kind == "documents":
            writer.write_json("documents.json", {"documents": writer.docs})
        writer.write_json("meta.json", {"format": 1, "content": writer.file_name,
                                        "index": writer.index, "info": info.model_dump()})
        target = self.dir(info.handle)
        for _attempt in range(3):
            if target.exists():     # renamed in whole, so meta.json is there unless damaged
                existing = self.read_meta(target)
                if existing is not None:
                    writer.discard()
                    if existing["info"].get("sha256") != info.sha256:
                        raise ContextError(f"handle {info.handle} is taken by different content (a 64-bit "
                                           "prefix collision): nothing was stored; report this")
                    return self._reuse(info.handle, existing, info.name)
                self._set_aside(target)
            try:
                self.files.rename(writer.dir, target)
            except OSError:
                continue            # lost a race with a concurrent load of the same content
            writer.placed()
            _fsync_dir(self.root)
            log.info("stored context %s (%s, %s, %s chars) from %s", info.handle, info.name, info.kind,
                     f"{info.characters:,}", info.source)
            return info
        raise ContextError(f"could not store the context in {self.root}: retry the load")

    def delete(self, handle: str) -> None:
        trash = self.root / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            self.files.rename(self.dir(handle), trash)
        except FileNotFoundError:
            raise self.unknown(handle) from None
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._documents_cache.pop(handle, None)

    def _set_aside(self, target: Path) -> None:
        """Remove a damaged handle directory (no readable meta.json) so a good copy can replace it."""
        trash = self.root / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            self.files.rename(target, trash)
        except FileNotFoundError:
            return                      # deleted meanwhile
        log.warning("replacing damaged context directory %s", target)
        shutil.rmtree(trash, ignore_errors=True)

    def _reuse(self, handle: str, meta: dict[str, Any], name: str) -> ContextInfo:
        """The content is already stored: record ``name`` as an alias and return the original."""
        info = ContextInfo.model_validate(meta["info"])
        if name != info.name and name not in info.aliases:
            with _META_LOCK:
                fresh = self.read_meta(self.dir(handle))
                if fresh is not None:
                    fresh["info"]["aliases"] = list(fresh["info"].get("aliases", [])) + [name]
                    try:
                        self._write_meta(self.dir(handle), fresh)
                        info = ContextInfo.model_validate(fresh["info"])
                    except OSError as exc:  # a name is not worth failing the load for
                        log.warning("could not record the alias of %s: %s", handle, exc.strerror)
        reply = info.model_copy(deep=True)
        reply.notes.append(f"this content was already stored as {info.name!r}; the same handle is returned")
        return reply

    @staticmethod
    def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
        write_private_text(directory / "meta.json", json.dumps(meta, ensure_ascii=False))

    # ----- clean-up -----------------------------------------------------------------------------

    def clean_leftovers(self) -> None:
        """Remove temp dirs of crashed loads and half-deleted handles."""
        for entry in os.listdir(self.root):
            path = self.root / entry
            if entry.startswith(TRASH_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif entry.startswith(TMP_PREFIX):
                if load_in_progress(path):
                    continue
                pid_text = entry[len(TMP_PREFIX):].split("-", 1)[0]
                pid = int(pid_text) if pid_text.isdigit() else -1
                try:
                    stale = time.time() - path.stat().st_mtime > STALE_TMP_S
                except OSError:
                    continue
                if pid == os.getpid() or not pid_alive(pid) or stale:
                    log.info("removing leftover temp dir %s", path)
                    shutil.rmtree(path, ignore_errors=True)


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
