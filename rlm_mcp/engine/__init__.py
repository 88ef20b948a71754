"""The Recursive Language Model runner, free of MCP.

``loop`` runs the root model and serves sub-calls and child RLMs; ``budget`` counts usage
against the limits; ``models`` is the only litellm importer (``limiter`` paces its calls);
``prompts`` and ``replies`` write and read the model's text; ``trajectory`` records a run on
disk; ``runs`` runs requests in the background for the server and the CLI."""

from rlm_mcp.engine.budget import Budget, ModelUsage
from rlm_mcp.engine.loop import RlmEngine, RunEvent, RunRequest, RunResult
from rlm_mcp.engine.prompts import ContextShape
from rlm_mcp.engine.runs import Run, RunManager, shape_of

__all__ = ["Budget", "ContextShape", "ModelUsage", "RlmEngine", "Run", "RunEvent", "RunManager", "RunRequest",
           "RunResult", "shape_of"]
