"""The Daytona backend: each sandbox is a Daytona cloud sandbox created from a snapshot.

The REPL is the same ``worker.py`` as everywhere else, speaking the same JSON-lines protocol,
carried by a Daytona *session command* (this package is the only importer of the ``daytona`` SDK):

* start: create the sandbox from the snapshot (labels, auto-stop, ephemeral, network blocked),
  upload ``worker.py`` and the context file in one bulk upload, open a session and run the
  worker in it with ``run_async=True`` and ``suppress_input_echo=True``;
* host -> worker: ``send_session_command_input`` (one HTTP request per batch of lines; a
  single writer keeps lines whole and in order, coalescing what queued up meanwhile);
* worker -> host: the command's log stream (``get_session_command_logs_async``, a WebSocket
  with ``follow=true``); the daemon relabels output line by line, the SDK demultiplexes it, and
  the transport reassembles protocol lines from stdout and keeps a tail of stderr. Its stdout
  callback is a coroutine that waits while a message's worth of lines is queued unread, so
  the SDK stops reading the WebSocket: memory stays bounded without dropping anything.

So ``llm_query`` is served on the host: the sandbox needs no network (``network_block_all``
by default) and never holds a key. Sandboxes are deleted on close, cancel and shutdown (the
provider deletes any it still owns); if the server dies, auto-stop plus ``ephemeral`` makes
Daytona delete them after ``RLM_MCP_DAYTONA_AUTO_STOP_MINUTES`` of inactivity.

``rlm-mcp sandbox daytona-snapshot`` builds the snapshot (:func:`create_snapshot`) from the
packaged ``images/daytona/Dockerfile``.

The modules, each importing only those before it: ``errors`` (SDK failures mapped to messages),
``account`` (API settings and deadlines, SDK clients, the register of sandboxes not deleted yet),
``transport`` (the session command as the worker's channel), ``sandbox`` (one remote REPL),
``provider`` (what the sandbox registry sees), ``snapshot`` (``rlm-mcp sandbox daytona-snapshot``).
"""

from rlm_mcp.sandbox.daytona.errors import ChannelLost, describe_error
from rlm_mcp.sandbox.daytona.provider import DaytonaProvider
from rlm_mcp.sandbox.daytona.sandbox import DEFAULT_SNAPSHOT, DaytonaSandbox
from rlm_mcp.sandbox.daytona.snapshot import SNAPSHOT_DISK_GB, create_snapshot
from rlm_mcp.sandbox.daytona.transport import SessionTransport

__all__ = ["DEFAULT_SNAPSHOT", "SNAPSHOT_DISK_GB", "ChannelLost", "DaytonaProvider", "DaytonaSandbox", "SessionTransport",
           "create_snapshot", "describe_error"]
