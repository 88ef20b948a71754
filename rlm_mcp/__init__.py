"""rlm-mcp: Recursive Language Models as MCP tools."""

__version__ = "0.1.0"
