"""What the MCP server and the command line both need, free of MCP: the engine, store and run
manager built from settings, contexts resolved from what a caller gave, stored run results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlm_mcp.config import Settings
from rlm_mcp.engine import RlmEngine, RunManager, RunResult, shape_of
from rlm_mcp.errors import ConfigError
from rlm_mcp.store import ContextStore


@dataclass
class Services:
    """What the tools and the command line delegate to; one per server process (or CLI run)."""

    settings: Settings
    store: ContextStore
    engine: RlmEngine
    runs: RunManager

    @classmethod
    def create(cls, settings: Settings, engine: RlmEngine | None = None) -> Services:
        """Everything built from ``settings``; ``engine`` when the caller already made one (the
        CLI checks its request before the store is opened and a large input copied into it)."""
        engine = engine or RlmEngine(settings, keep_sandboxes=True)
        return cls(settings, ContextStore(settings), engine, RunManager(engine, settings.max_runs))

    async def aclose(self) -> None:
        await self.runs.aclose()
        await self.engine.aclose()
        await self.engine.models.aclose()

    def context_for(self, handle: str | None, handles: list[str] | None,
                    context: str | None, continue_from: str | None = None) -> dict[str, Any]:
        """The context of a run request from exactly one of a handle, a list of handles or
        small inline text (blocking: inline text is stored first). With ``continue_from`` and
        none of them, the earlier run's context is used (``{}``: the engine finds it)."""
        given = [n for n, v in (("handle", handle), ("handles", handles), ("context", context)) if v is not None]
        if continue_from is not None and not given:
            return {}
        if len(given) != 1:
            raise ConfigError("give exactly one of handle, handles or context"
                              + (f" (got {', '.join(given)})" if given else "; load large inputs with rlm_load_context first"))
        store = self.store
        if handle is not None:
            info = store.get(handle)
        elif handles is not None:
            if not handles:
                raise ConfigError("handles is empty: pass at least one handle from rlm_load_context")
            info = store.combine(handles) if len(handles) > 1 else store.get(handles[0])
        else:
            assert context is not None
            limit = self.settings.max_inline_chars  # the one inline limit (RLM_MCP_MAX_INLINE_CHARS)
            if len(context) > limit:
                raise ConfigError(f"the inline context has {len(context):,} characters (limit {limit:,}): "
                                  "save it to a file, load it with rlm_load_context (path or url) and pass the handle")
            info = store.load_text(context, name="inline context")
        return {"context": store.context_file(info.handle), "shape": shape_of(info)}

    def stored_result(self, run_id: str) -> RunResult:
        """The result of a run this process is not running, from its trajectory (blocking)."""
        stored = self.runs.stored_result(run_id)
        if stored is None:
            self.runs.get(run_id)  # raises the "unknown run_id" error
        assert stored is not None
        return stored
