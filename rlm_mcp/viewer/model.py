"""The view-model: one run's trajectory files read into compact, bounded JSON for the viewer.

Reads the root file ``<run_id>.jsonl`` and every child RLM file next to it
(``<run_id>.<n>.jsonl``, grandchildren ``<run_id>.<n>.<m>.jsonl``: the engine names a child after
its parent plus a tree-wide counter), and builds a tree of nodes. Strings are excerpts cut to a
budget for the whole tree, with a ``... [+N chars]`` marker (the trajectory module's own marker,
whose counts add up when an engine excerpt is cut again); the context is never in a trajectory
and prompts (the messages sent to the root model) are not read at all.

Tolerant by design: a run in progress (metadata ``status: running``, a last line half written),
lines that are not JSON or not objects, fields of the wrong type. Nothing here trusts a string:
the renderer puts them in the page as text only.

Over 500 lines on purpose: the budget pass (caps from every string's length) and the builder that
applies those caps are two halves of one algorithm over the same tolerant readers.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rlm_mcp.engine.replies import code_blocks, prose
from rlm_mcp.engine.runs import SERVER_STOPPED
from rlm_mcp.engine.trajectory import process_gone
from rlm_mcp.errors import ConfigError, RunNotFound

VIEW_FORMAT = "rlm-mcp-view/1"
DEFAULT_BUDGET_CHARS = 1_500_000  # all excerpts of a run tree: keeps the page of a very large run near 3 MB
MAX_NODES = 500  # RLMs (root + children) shown; more are counted, not read
LOCALS_SHOWN = 30

# Longest excerpt per kind of field, and the shortest it may shrink to when a large run has to fit
# the budget. Sub-call excerpts are the most numerous (10,000 in a large run), so they go first.
CAPS: dict[str, int] = {"query": 4_000, "answer": 8_000, "error": 4_000, "prose": 6_000, "code": 8_000,
                        "stdout": 6_000, "stderr": 3_000, "final": 4_000, "local": 200, "call": 500}
FLOORS: dict[str, int] = {"query": 400, "answer": 1_000, "error": 600, "prose": 300, "code": 400,
                          "stdout": 200, "stderr": 200, "final": 400, "local": 60, "call": 40}

_MARKER = re.compile(r"\.\.\. \[\+([\d,]+) chars\]\Z")
_RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


# ----- small readers that never raise on a field of the wrong type -------------------------------

def _str(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int:
    number = _num(value)
    return int(number) if number is not None else 0


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with a ``... [+N chars]`` marker.

    A text that already ends with the marker (an excerpt the engine wrote) keeps one marker whose
    count covers both cuts."""
    match = _MARKER.search(text)
    already = int(match.group(1).replace(",", "")) if match else 0
    body = text[:match.start()] if match else text
    if len(body) <= limit:
        return text
    return body[:limit] + f"... [+{len(body) - limit + already:,} chars]"


def _outcome(meta: dict[str, Any]) -> tuple[str, Any]:
    """(status, error) of a metadata line. "running" written by a server that has since stopped
    is shown as the tools report it (failed, the server stopped during the run); the file is
    left as it is: the next server settles it, and a page may be opened on another machine's copy."""
    status = _str(meta.get("status")) or ("running" if not meta else "unknown")
    owner = meta.get("server")
    if status == "running" and isinstance(owner, str) and process_gone(owner):
        return "failed", meta.get("error") or SERVER_STOPPED
    return status, meta.get("error")


def _timestamp(value: Any) -> float | None:
    """Seconds since the epoch of an ISO timestamp, or None."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


# ----- files -------------------------------------------------------------------------------------

def check_run_id(run_id: str) -> str:
    """``run_id`` if it can only name a file inside the trajectory directory; ConfigError if not."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(f"{run_id!r} is not a run id: use the run_id rlm_complete returned "
                          "(letters, digits, '-', '_' and '.')")
    return run_id


def locate(source: str | Path, run_id: str | None = None) -> tuple[Path, str]:
    """(trajectory directory, run id) from a directory plus run id, or a path to a ``.jsonl`` file."""
    path = Path(source).expanduser()
    if run_id is None:
        if path.suffix != ".jsonl":
            raise ConfigError(f"{path} is not a trajectory: give a .jsonl file, or a directory and a run id")
        directory, run_id = path.parent, path.name.removesuffix(".jsonl")
    else:
        directory = path
    check_run_id(run_id)
    if not (directory / f"{run_id}.jsonl").is_file():
        raise RunNotFound(f"no trajectory for run {run_id!r} in {directory}: `rlm-mcp runs` lists the "
                          "runs there (a queued run has no file until it starts)")
    return directory, run_id


def trajectory_files(directory: Path, run_id: str) -> dict[str, Path]:
    """Run id -> file for the run and every child RLM below it (any depth), root first."""
    pattern = re.compile(re.escape(run_id) + r"((?:\.\d+)*)\.jsonl")
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in directory.glob(f"{run_id}*.jsonl"):  # check_run_id allows no glob characters
        match = pattern.fullmatch(path.name)
        if match:
            key = tuple(int(part) for part in match.group(1).split(".")[1:])
            found[path.name.removesuffix(".jsonl")] = (key, path)
    ordered = sorted(found.items(), key=lambda item: (len(item[1][0]) > 0, item[1][0]))
    return {name: path for name, (_, path) in ordered}


def view_etag(source: str | Path, run_id: str | None = None) -> str:
    """A short tag that changes whenever any file of the run changes (stat only: cheap to poll)."""
    directory, run_id = locate(source, run_id)
    digest = hashlib.sha256(VIEW_FORMAT.encode())
    for name, path in trajectory_files(directory, run_id).items():
        try:
            stat = path.stat()
        except OSError:  # a file replaced between listing and stat: the next poll sees it
            continue
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino};".encode())
    return digest.hexdigest()[:20]


@dataclass
class _Raw:
    """One file as read: metadata, iteration records, and what could not be read."""

    run_id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    partial_tail: bool = False


def _read(run_id: str, path: Path) -> _Raw:
    raw = _Raw(run_id)
    try:
        data = path.read_bytes()
    except OSError:
        raw.bad_lines = 1
        return raw
    lines = data.split(b"\n")
    # The writer flushes whole lines; bytes after the last newline are a line still being written.
    tail = lines.pop()
    if tail.strip():
        raw.partial_tail = True
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8", errors="replace"))
        except ValueError:
            raw.bad_lines += 1
            continue
        if not isinstance(record, dict):
            raw.bad_lines += 1
        elif record.get("type") == "metadata":
            raw.metadata = record
        else:
            raw.records.append(record)
    return raw


# ----- budget ------------------------------------------------------------------------------------

def _lengths(raws: Iterable[_Raw]) -> dict[str, list[int]]:
    """The length of every string the view will hold, by kind of field."""
    found: dict[str, list[int]] = {kind: [] for kind in CAPS}

    def add(kind: str, value: Any) -> None:
        if value is not None:
            found[kind].append(len(_str(value)))

    for raw in raws:
        meta = raw.metadata
        add("query", meta.get("query"))
        add("answer", meta.get("answer"))
        add("error", _outcome(meta)[1])
        for record in raw.records:
            add("prose", record.get("response"))
            add("final", record.get("final_answer"))
            for block in _list(record.get("code_blocks")):
                block = _dict(block)
                result = _dict(block.get("result"))
                add("code", block.get("code"))
                add("stdout", result.get("stdout"))
                add("stderr", result.get("stderr"))
                add("final", result.get("final_answer"))
                for value in list(_dict(result.get("locals")).values())[:LOCALS_SHOWN]:
                    add("local", value)
                for call in _list(result.get("rlm_calls")):
                    call = _dict(call)
                    add("call", call.get("prompt"))
                    add("call", call.get("response"))
    return found


def _caps_for(raws: list[_Raw], budget: int) -> tuple[dict[str, int], bool]:
    """Caps that fit ``budget``: every kind's cap times one factor (not below its floor), the
    largest factor whose excerpts add up to at most ``budget`` characters."""
    table = {}
    for kind, lengths in _lengths(raws).items():
        lengths.sort()
        table[kind] = (lengths, list(itertools.accumulate(lengths, initial=0)))

    def caps(factor: float) -> dict[str, int]:
        return {kind: max(FLOORS[kind], int(CAPS[kind] * factor)) for kind in CAPS}

    def used(chosen: dict[str, int]) -> int:
        total = 0
        for kind, (lengths, prefix) in table.items():
            below = bisect.bisect_right(lengths, chosen[kind])  # these fit whole; the rest are cut
            total += prefix[below] + chosen[kind] * (len(lengths) - below)
        return total

    if used(CAPS) <= budget:
        return dict(CAPS), False
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if used(caps(middle)) <= budget:
            low = middle
        else:
            high = middle
    return caps(low), True


# ----- building ----------------------------------------------------------------------------------

class _Builder:
    def __init__(self, caps: dict[str, int]) -> None:
        self.caps = caps

    def text(self, kind: str, value: Any) -> str:
        return cut(_str(value), self.caps[kind])

    def optional(self, kind: str, value: Any) -> str | None:
        return None if value is None else self.text(kind, value)

    def node(self, raw: _Raw) -> dict[str, Any]:
        meta = raw.metadata
        iterations = [self.iteration(index, record) for index, record in enumerate(raw.records)]
        usage = {_str(model): {"calls": _int(u.get("calls")), "input_tokens": _int(u.get("input_tokens")),
                               "output_tokens": _int(u.get("output_tokens")), "cost_usd": _num(u.get("cost_usd"))}
                 for model, u in ((m, _dict(u)) for m, u in _dict(meta.get("usage")).items())}
        context = _dict(meta.get("context"))
        limits = {_str(k)[:60]: (v if isinstance(v, bool) or v is None else
                                 _num(v) if isinstance(v, (int, float)) else _str(v)[:100])
                  for k, v in list(_dict(meta.get("limits")).items())[:30]
                  if v is None or isinstance(v, (int, float, str, bool))}
        started = _timestamp(meta.get("started_at"))
        finished = _timestamp(meta.get("finished_at"))
        elapsed = _num(meta.get("elapsed_s"))
        status, error = _outcome(meta)
        # Most sub-calls use one model: name it once per node, and only the exceptions per call.
        calls = [call for it in iterations for block in it["blocks"] for call in block["calls"]]
        counted = Counter(call.get("model") for call in calls if call.get("model"))
        call_model = counted.most_common(1)[0][0] if counted else None
        for call in calls:
            if call_model is not None and call.get("model") == call_model:
                del call["model"]
        node: dict[str, Any] = {
            "id": raw.run_id,
            "call_model": call_model,
            "depth": _int(meta.get("depth")) or raw.run_id.count(".") + 1,
            "status": status,
            "query": self.text("query", meta.get("query")),
            "answer": self.optional("answer", meta.get("answer")),
            "error": self.optional("error", error),
            "limit": _str(meta.get("limit")) or None,
            "model": _str(meta.get("root_model")) or None,
            "other_models": [_str(m) for m in _list(meta.get("other_backends"))][:10],
            "sandbox": _str(meta.get("environment_type")) or None,
            "context": {"kind": _str(context.get("kind")) or None, "characters": _num(context.get("characters")),
                        "documents": _num(context.get("documents")), "name": _str(context.get("name")) or None},
            "limits": limits,
            "started_at": _str(meta.get("started_at")) or None,
            "finished_at": _str(meta.get("finished_at")) or None,
            "elapsed_s": elapsed if elapsed is not None else (
                round(finished - started, 3) if started is not None and finished is not None else None),
            "usage": usage or None,
            "subcalls": _num(meta.get("subcalls")),
            "iterations": iterations,
            "bad_lines": raw.bad_lines,
            "partial_tail": raw.partial_tail,
            "children": [],
        }
        return node

    def iteration(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        response = _str(record.get("response"))
        usage = _dict(record.get("usage"))
        blocks = [self.block(_dict(b)) for b in _list(record.get("code_blocks"))]
        ran = Counter(block.pop("code_full") for block in blocks)
        skipped = []
        for code in code_blocks(response):
            if ran[code] > 0:
                ran[code] -= 1
            else:
                skipped.append(code)
        for code in skipped:  # the run ended (answer, limit) before these blocks ran
            blocks.append({"code": self.text("code", code), "skipped": True, "calls": []})
        iteration_time = _num(record.get("iteration_time"))
        return {
            "i": index,
            "n": _int(record.get("iteration")),
            "end": _str(record.get("timestamp")) or None,
            "dur": iteration_time,
            # The engine logs the out-of-iterations "answer now" call with no code and time 0.
            "answer_now": iteration_time == 0.0 and not blocks and index > 0,
            "model": _str(usage.get("model")) or None,
            "in": _int(usage.get("input_tokens")),
            "out": _int(usage.get("output_tokens")),
            "cost": _num(usage.get("cost_usd")),
            "prose": self.text("prose", prose(response)),
            "final": self.optional("final", record.get("final_answer")),
            "blocks": blocks,
        }

    def block(self, block: dict[str, Any]) -> dict[str, Any]:
        result = _dict(block.get("result"))
        code = _str(block.get("code"))
        view: dict[str, Any] = {
            "code_full": code,
            "code": self.text("code", code),
            "stdout": self.text("stdout", result.get("stdout")),
            "stderr": self.text("stderr", result.get("stderr")),
            "dur": _num(result.get("execution_time")),
            "final": self.optional("final", result.get("final_answer")),
            "state_lost": bool(result.get("state_lost")),
            "timed_out": bool(result.get("timed_out")),
            "calls": [self.call(_dict(c)) for c in _list(result.get("rlm_calls"))],
        }
        # Optional fields: truncation counts and notices, when the engine records them.
        for key in ("stdout_dropped", "stderr_dropped"):
            if _int(result.get(key)):
                view[key] = _int(result.get(key))
        notices = [self.text("stderr", n) for n in _list(result.get("notices"))][:10]
        if notices:
            view["notices"] = notices
        if _str(result.get("error")):
            view["error"] = self.text("stderr", result.get("error"))
        local_items = list(_dict(result.get("locals")).items())
        if local_items:
            view["locals"] = [[_str(k)[:100], self.text("local", v)] for k, v in local_items[:LOCALS_SHOWN]]
        return view

    def call(self, call: dict[str, Any]) -> dict[str, Any]:
        # 10,000 of these in a large run: fields that are empty or zero are left out.
        usage = _dict(call.get("usage_summary"))
        # Token counts: ours in usage_summary, or the reference logger's prompt/completion_tokens.
        tokens_in = usage["input_tokens"] if "input_tokens" in usage else call.get("prompt_tokens")
        tokens_out = usage["output_tokens"] if "output_tokens" in usage else call.get("completion_tokens")
        view: dict[str, Any] = {"prompt": self.text("call", call.get("prompt")),
                                "response": self.text("call", call.get("response")),
                                "in": _int(tokens_in), "out": _int(tokens_out)}
        model = _str(call.get("root_model"))
        if model:
            view["model"] = model
        duration = _num(call.get("execution_time"))
        if duration is not None:
            view["dur"] = round(duration, 3)
        cost = _num(usage.get("cost_usd"))
        if cost is not None:
            view["cost"] = round(cost, 8)
        if _str(usage.get("child_run_id")):
            view["child"] = _str(usage.get("child_run_id"))
            view["tokens"] = _int(usage.get("tokens"))
        for key in ("start_s", "start"):  # not yet recorded by the engine: see the package notes
            if _num(call.get(key)) is not None:
                view["start"] = _num(call.get(key))
                break
        return view


def _totals(node: dict[str, Any]) -> dict[str, Any]:
    """Sums for ``node`` and (tokens, cost) for its whole subtree; children first.

    A sub-call that started a child RLM counts the child's own recorded tokens (from its file),
    so the totals hold for trajectories written by older versions too, whose
    ``usage_summary.tokens`` also counted whatever ran concurrently with the child."""
    children = {child["id"]: _totals(child) for child in node["children"]}
    root_in = root_out = calls = call_tokens = 0
    cost = 0.0
    priced = False
    model_s = code_s = 0.0
    for iteration in node["iterations"]:
        root_in += iteration["in"]
        root_out += iteration["out"]
        if iteration["cost"] is not None:
            cost += iteration["cost"]
            priced = True
        code_time = sum(b.get("dur") or 0.0 for b in iteration["blocks"])
        code_s += code_time
        model_s += max(0.0, (iteration["dur"] or 0.0) - code_time)
        for block in iteration["blocks"]:
            for call in block["calls"]:
                calls += 1
                child = children.get(call.get("child") or "")
                if child is not None:
                    call["tokens"] = child["tokens"]
                elif call.get("child"):
                    call_tokens += call.get("tokens") or 0  # the child's file is missing
                else:
                    call_tokens += call["in"] + call["out"]
                if call.get("cost") is not None:
                    cost += call["cost"]
                    priced = True
    tokens = root_in + root_out + call_tokens
    for child in children.values():
        tokens += child["tokens"]
        if child["cost_usd"] is not None:
            cost += child["cost_usd"]
            priced = True
    totals: dict[str, Any] = {
        "iterations": len(node["iterations"]), "root_input_tokens": root_in, "root_output_tokens": root_out,
        "subcalls": calls, "subcall_tokens": call_tokens, "tokens": tokens,
        "cost_usd": round(cost, 6) if priced else None, "model_s": round(model_s, 3), "code_s": round(code_s, 3)}
    node["totals"] = totals
    return totals


def _tree(nodes: dict[str, dict[str, Any]], root_id: str) -> dict[str, Any]:
    """Hang each child node under its parent (the id without its last ``.n``)."""
    for node_id, node in nodes.items():
        if node_id == root_id:
            continue
        parent = node_id.rsplit(".", 1)[0]
        while parent not in nodes and parent != root_id and "." in parent:
            parent = parent.rsplit(".", 1)[0]  # a missing middle file: attach higher up
        nodes.get(parent, nodes[root_id])["children"].append(node)
    return nodes[root_id]


def build_view(source: str | Path, run_id: str | None = None, *,
               budget_chars: int = DEFAULT_BUDGET_CHARS) -> dict[str, Any]:
    """The view-model of one run: ``source`` is the trajectory directory plus ``run_id``, or the
    path of a run's ``.jsonl`` file. Blocking file I/O (call it in a thread from async code).

    Raises RunNotFound when there is no such trajectory, ConfigError for an unusable run id."""
    directory, run_id = locate(source, run_id)
    if budget_chars < 10_000:
        raise ConfigError(f"budget_chars={budget_chars} is too small to show a run: use at least 10,000")
    etag = view_etag(directory, run_id)  # before reading: a change while reading shows up next poll
    files = trajectory_files(directory, run_id)
    omitted = max(0, len(files) - MAX_NODES)
    raws = [_read(name, path) for name, path in list(files.items())[:MAX_NODES]]
    caps, shrunk = _caps_for(raws, budget_chars)
    builder = _Builder(caps)
    nodes = {raw.run_id: builder.node(raw) for raw in raws}
    root = _tree(nodes, run_id)
    _totals(root)
    return {
        "format": VIEW_FORMAT,
        "run_id": run_id,
        "etag": etag,
        "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "running": any(node["status"] == "running" for node in nodes.values()),
        "excerpts": {"budget_chars": budget_chars, "shrunk": shrunk, "caps": caps},
        "children_omitted": omitted,
        "root": root,
    }


def iter_nodes(view: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of a view, root first, depth first."""
    stack = [view["root"]]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node["children"]))


# ----- recent runs (for `rlm-mcp runs` and a /runs page) -----------------------------------------

def run_summaries(directory: str | Path, limit: int = 50) -> list[dict[str, Any]]:
    """The newest root runs in a trajectory directory, newest first, from their metadata lines
    only: run_id, status, query (excerpt), started_at, elapsed_s, iterations, cost_usd, path."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        return []
    roots = []
    for path in folder.glob("*.jsonl"):
        if "." in path.name.removesuffix(".jsonl"):
            continue  # a child RLM's file
        try:
            roots.append((path.stat().st_mtime, path))
        except OSError:
            continue
    roots.sort(reverse=True)
    summaries = []
    for mtime, path in roots[:max(0, limit)]:
        try:
            with path.open("rb") as handle:
                first = handle.readline(1_000_000)
            meta = _dict(json.loads(first.decode("utf-8", errors="replace")))
        except (OSError, ValueError):
            meta = {}
        usage = _dict(meta.get("usage"))
        costs = [_num(_dict(u).get("cost_usd")) for u in usage.values()]
        known = [c for c in costs if c is not None]
        summaries.append({
            "run_id": path.name.removesuffix(".jsonl"),
            "status": _outcome(meta)[0] if meta else "unknown",
            "query": cut(" ".join(_str(meta.get("query")).split()), 160),
            "started_at": _str(meta.get("started_at")) or None,
            "elapsed_s": _num(meta.get("elapsed_s")),
            "iterations": _num(meta.get("iterations")),
            "cost_usd": round(sum(known), 6) if known else None,
            "tokens": sum(_int(_dict(u).get("input_tokens")) + _int(_dict(u).get("output_tokens"))
                          for u in usage.values()),
            "modified": datetime.fromtimestamp(mtime).astimezone().isoformat(timespec="seconds"),
            "path": str(path),
        })
    return summaries
