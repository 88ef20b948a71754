"""MCP wiring: the only package that imports ``mcp``. ``tools`` registers the tools, resources
and prompts; ``results`` shapes what they return; ``http`` is the HTTP transports' auth and
bind rules; ``app`` serves."""

from rlm_mcp.server.app import serve
from rlm_mcp.server.http import HttpAuth, http_app, http_auth, is_loopback
from rlm_mcp.server.tools import build_server
from rlm_mcp.services import Services

__all__ = ["HttpAuth", "Services", "build_server", "http_app", "http_auth", "is_loopback", "serve"]
