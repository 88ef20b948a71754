"""The Recursive Language Model runner, free of MCP.

``loop`` runs requests (``results`` holds what a run takes and gives back); ``rlm`` is one RLM's
loop, ``subcalls`` serves its REPL's ``llm_query``/``rlm_query`` and ``tree`` holds what a run
shares with its child RLMs; ``budget`` counts usage against the limits; ``models`` is the only
litellm importer (``limiter`` paces its calls, ``failures`` words them, ``prices`` prices them);
``prompts`` and ``replies`` write and read the model's text; ``trajectory`` records a run on
disk; ``runs`` runs requests in the background for the server and the CLI."""

from rlm_mcp.engine.budget import Budget, ModelUsage
from rlm_mcp.engine.loop import RlmEngine
from rlm_mcp.engine.results import RunEvent, RunRequest, RunResult
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.engine.runs import Run, RunManager, shape_of

__all__ = ["Budget", "ContextShape", "ModelUsage", "RlmEngine", "Run", "RunEvent", "RunManager", "RunRequest",
           "RunResult", "shape_of"]
