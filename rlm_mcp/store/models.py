"""What the store reports: a stored context's info, a page of its text, and how handles are made."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import pydantic

HANDLE_RE = re.compile(r"ctx_[0-9a-f]{16}")


def handle_for(kind: str, sha256: str) -> str:
    """A context's handle. The kind is part of the identity: a text file whose bytes equal a
    documents file is a different context."""
    return "ctx_" + hashlib.sha256(f"{kind}:{sha256}".encode()).hexdigest()[:16]


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
