"""The context store: large inputs loaded once, kept on disk, handed to sandboxes by handle.

``front`` is what callers use (load, get, list, delete, peek); ``layout`` keeps the handle
directories (commit, metadata, aliases, clean-up); ``paths`` guards loads from the host (allowed
roots, safe open); ``io`` streams and decodes content; ``scan`` walks directories; ``urlfetch``
fetches URLs safely; ``models`` holds what the store reports."""

from rlm_mcp.store.front import PEEK_MAX, ContextStore
from rlm_mcp.store.io import ChunkSizes
from rlm_mcp.store.models import ContextInfo, ContextPage
from rlm_mcp.store.paths import HostFiles

__all__ = ["PEEK_MAX", "ChunkSizes", "ContextInfo", "ContextPage", "ContextStore", "HostFiles"]
