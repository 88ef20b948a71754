"""The context store: large inputs loaded once, kept on disk, handed to sandboxes by handle.

``front`` is what callers use (load, get, list, delete, peek); ``io`` streams and decodes
content into the store's layout; ``scan`` walks directories; ``urlfetch`` fetches URLs safely."""

from rlm_mcp.store.front import ContextInfo, ContextPage, ContextStore

__all__ = ["ContextInfo", "ContextPage", "ContextStore"]
