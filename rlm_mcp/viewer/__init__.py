"""The run viewer: one self-contained HTML page that shows an RLM run from its trajectory files.

Three ways to feed the same page (``rlm_mcp/viewer/assets/``, package data; vanilla JS, no
network but its own data URL, no Node at run time):

1. **Static file** (``rlm-mcp view RUN_ID --out FILE``)::

       view = build_view(settings.home / "trajectories", run_id)   # or build_view(path_to_jsonl)
       path = export_run(view, out, open_browser=not no_open)    # writes atomically

2. **Served** (``GET /runs/{run_id}`` next to ``/mcp``, behind the same token and Host/Origin
   checks)::

       GET /runs/{run_id}        -> render_html(view_or_None, data_url=f"/runs/{run_id}/view.json")
       GET /runs/{run_id}/view.json
           etag = view_etag(directory, run_id)                   # stat only: cheap per poll
           If-None-Match == f'"{etag}"'  -> 304
           else -> 200, JSON of build_view(directory, run_id), header ETag: f'"{etag}"',
                   Cache-Control: no-store
       GET /runs                 -> run_summaries(directory) (for a list page or ``rlm-mcp runs``)

   The page polls ``data_url`` every ``poll_ms`` while ``view["running"]`` is true and stops when
   the run has ended. Its fetch sends cookies of the same origin (``credentials: same-origin``)
   but no Authorization header: a token-protected server must accept the page's session some
   other way (a cookie set by ``/runs/{id}``, or a token in ``data_url``'s query, which the page
   uses verbatim). ``build_view`` reads files: call it through ``asyncio.to_thread``. A relative
   ``data_url`` is fetched from the page's origin; an absolute one is allowed by the page's CSP.

3. **MCP App** (SEP-1865, extension ``io.modelcontextprotocol/ui``, revision 2026-01-26):

   - Resource ``APP_RESOURCE_URI`` (``ui://rlm-mcp/run-viewer``), MIME ``MCP_APP_MIME``
     (``text/html;profile=mcp-app``), content ``app_html()``; resource ``_meta``:
     ``{"ui": {"prefersBorder": true}}`` and no ``csp`` (the page needs no network: the host's
     restrictive default is right).
   - ``rlm_complete``, ``rlm_get_result`` and ``rlm_get_trajectory`` declare
     ``_meta: {"ui": {"resourceUri": APP_RESOURCE_URI}}``. The app needs from their result only
     ``structuredContent.run_id`` (all three have it already); it shows ``status`` meanwhile.
   - A new tool ``VIEW_TOOL`` = ``rlm_get_run_view`` with
     ``_meta: {"ui": {"resourceUri": APP_RESOURCE_URI, "visibility": ["app"]}}`` (hidden from the
     model; hosts let only the app call it). Arguments: ``run_id: str``, ``etag: str | None``.
     Result: ``structuredContent`` = ``build_view(directory, run_id, budget_chars=...)`` (the
     view-model: ``format == "rlm-mcp-view/1"``), or ``{"run_id", "etag", "unchanged": true}``
     when ``etag`` equals ``view_etag(...)``; ``content`` = one short text line. Unknown run ->
     ``isError`` with the usual message. A budget of ~1,000,000 chars suits hosts that cap tool
     results; a tool result that is itself a view-model is rendered directly too.
   - The page: ``ui/initialize`` (``appInfo``, ``appCapabilities``, ``protocolVersion``) ->
     applies ``hostContext`` (theme, style variables, container size) -> sends
     ``ui/notifications/initialized`` -> reads ``ui/notifications/tool-input`` (shows the query /
     run id) and ``ui/notifications/tool-result`` -> ``tools/call`` ``rlm_get_run_view`` ->
     renders; while the run is running it calls again every ``poll_ms`` with the last ``etag``.
     It sends ``ui/notifications/size-changed`` when its size changes, answers ``ping`` and
     ``ui/resource-teardown`` (and stops polling), and only accepts messages from
     ``window.parent``.

The view-model (``build_view``; ``rlm_mcp.viewer.model``): ``{format, run_id, etag, generated_at,
running, excerpts: {budget_chars, shrunk, caps}, children_omitted, root}``; a node is ``{id, depth,
status, query, answer, error, limit, model, other_models, sandbox, context, limits, started_at,
finished_at, elapsed_s, usage, subcalls, iterations, totals, bad_lines, partial_tail, children}``;
an iteration ``{i, n, end, dur, answer_now, model, in, out, cost, prose, final, blocks}``; a block
``{code, stdout, stderr, error?, dur, final, state_lost, timed_out, stdout_dropped?,
stderr_dropped?, notices?, locals?, calls, skipped?}``; a sub-call ``{model, prompt, response,
dur, in, out, cost, child?, tokens?, start?}``. All strings are bounded excerpts (``... [+N
chars]``); prompts sent to the root model and the context are never included.

What the trajectory does not record (yet), and the viewer shows when it does:
- sub-call start times: the sub-calls-in-flight chart needs ``start_s`` (seconds since the root
  run started) in each ``rlm_calls`` entry; without it the page says the chart is unavailable;
- ``stdout_dropped`` / ``stderr_dropped`` / ``notices`` of a cell (``CellResult`` has them, the
  engine's ``_cell_record`` does not write them): shown as truncation notices when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlm_mcp.viewer.model import (
    DEFAULT_BUDGET_CHARS,
    VIEW_FORMAT,
    build_view,
    check_run_id,
    iter_nodes,
    locate,
    run_summaries,
    trajectory_files,
    view_etag,
)
from rlm_mcp.viewer.render import (
    APP_PROTOCOL_VERSION,
    APP_RESOURCE_URI,
    DEFAULT_POLL_MS,
    MCP_APP_MIME,
    VIEW_TOOL,
    app_html,
    open_in_browser,
    render_html,
    script_json,
    write_html,
)

__all__ = [
    "APP_PROTOCOL_VERSION", "APP_RESOURCE_URI", "DEFAULT_BUDGET_CHARS", "DEFAULT_POLL_MS", "MCP_APP_MIME",
    "VIEW_FORMAT", "VIEW_TOOL", "app_html", "build_view", "check_run_id", "export_run", "iter_nodes", "locate",
    "open_in_browser", "render_html", "run_summaries", "script_json", "trajectory_files", "view_etag",
    "write_html",
]


def export_run(view: dict[str, Any], out: str | Path, *, open_browser: bool = False) -> Path:
    """Write a static page for ``view`` to ``out`` (atomically) and, with ``open_browser``, open it
    in the default browser (a failure to open is logged, not raised: the file is there).
    Returns the absolute path."""
    path = write_html(render_html(view), out)
    if open_browser:
        open_in_browser(path)
    return path
