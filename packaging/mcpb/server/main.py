"""Entry point of the rlm-mcp MCP Bundle.

The host runs it with uv in an environment built from the bundle's pyproject.toml (rlm-mcp from
the wheel shipped next to it); with no arguments rlm-mcp serves MCP over stdio.
"""

from rlm_mcp.cli import main

if __name__ == "__main__":
    main()
