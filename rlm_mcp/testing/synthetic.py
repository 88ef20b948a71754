"""Synthetic trajectories in the engine's exact format, for the viewer's tests and benchmark.

Written through the engine's own :class:`~rlm_mcp.engine.trajectory.TrajectoryWriter` (metadata line
rewritten at the end, one line per iteration, child RLMs in ``<run_id>.<n>.jsonl``), with the
record fields ``trajectory.iteration_record`` and ``cell_record`` write. Sizes are chosen to look like
real runs: replies with prose and code, outputs of a few hundred to a few thousand characters,
sub-call excerpts cut at 500 characters like the engine cuts them.

    python -m rlm_mcp.testing.synthetic DIR [--iterations 1000 --subcalls 10000 --children 50]
"""

from __future__ import annotations

import argparse
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from rlm_mcp.engine.trajectory import TrajectoryWriter, excerpt

HOSTILE = '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
WORDS = ("the context holds records of shipments ledger entries and notes; the secret code appears "
         "once near the middle of a long document so we split the text into chunks and ask a sub-model "
         "about each chunk then check the candidates before answering").split()


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def _metadata(run_id: str, root_id: str, depth: int, query: str, model: str) -> dict[str, Any]:
    return {
        "root_model": model, "max_depth": 2, "max_iterations": 1000, "backend": "litellm",
        "backend_kwargs": {"model_name": model, "api_base": None}, "environment_type": "docker",
        "environment_kwargs": {}, "other_backends": ["openai/gpt-4o-mini"], "run_id": run_id,
        "root_run_id": root_id, "depth": depth, "query": excerpt(query, 4_000),
        "context": {"kind": "documents", "characters": 48_000_000, "documents": 12_000, "name": "corpus"},
        "limits": {"max_iterations": 1000, "max_depth": 2, "cell_timeout_s": 300, "timeout_s": 7200,
                   "max_subcalls": None, "max_tokens": None, "max_cost_usd": 50.0, "max_output_chars": 20_000,
                   "max_concurrency": 32},
    }


class _Clock:
    """Timestamps that advance with the synthetic durations (ISO, like the writer's)."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.now = start

    def advance(self, seconds: float) -> str:
        self.now += timedelta(seconds=seconds)
        return self.now.isoformat(timespec="milliseconds")

    def offset(self) -> float:
        return (self.now - self.start).total_seconds()


def _iteration(rng: random.Random, clock: _Clock, number: int, calls: int, child_ids: list[str],
               with_start_times: bool, hostile: bool) -> dict[str, Any]:
    code = ("chunks = [context[i:i + 400_000] for i in range(0, len(context), 400_000)]\n"
            f"replies = llm_query_batched([f'Find the code in: {{c}}' for c in chunks[:{calls}]])\n"
            "hits = [r for r in replies if r.strip() != 'NONE']\n"
            + "\n".join(f"# {_words(rng, 12)}" for _ in range(rng.randint(2, 30)))
            + "\nprint(len(hits), hits[:3])")
    if hostile:
        code += f"\nprint({HOSTILE!r})"
    second = f"summary = {_words(rng, 6)!r}\nprint(summary)"
    reply = (f"{_words(rng, rng.randint(20, 120))}\n\n```repl\n{code}\n```\n\n"
             f"{_words(rng, 10)}\n\n```repl\n{second}\n```")
    started = clock.offset()
    model_s = rng.uniform(0.5, 4.0)
    exec_s = rng.uniform(0.2, 6.0)
    rlm_calls = []
    for k in range(calls):
        child = child_ids.pop() if child_ids else None
        duration = rng.uniform(0.3, 3.0)
        call: dict[str, Any] = {
            "root_model": "openai/gpt-4o-mini",
            "prompt": excerpt(f"Find the code in: {_words(rng, 150)}", 500),
            "response": excerpt("NONE" if rng.random() < 0.9 else f"The code is XK-{k}. {_words(rng, 30)}", 500),
            "usage_summary": ({"tokens": rng.randint(5_000, 50_000), "child_run_id": child} if child else
                              {"input_tokens": rng.randint(2_000, 100_000), "output_tokens": rng.randint(5, 400),
                               "cost_usd": rng.uniform(0.0005, 0.02)}),
            "execution_time": round(duration, 4),
        }
        if with_start_times:
            call["start_s"] = round(started + model_s + rng.uniform(0, max(0.0, exec_s - 0.3)), 4)
        rlm_calls.append(call)
    stdout = "\n".join(f"{i}: {_words(rng, 10)}" for i in range(rng.randint(1, 60)))
    if hostile:
        stdout += "\n" + HOSTILE
    blocks: list[dict[str, Any]] = [
        {"code": code, "result": {"stdout": stdout, "stderr": "", "locals": {
            "chunks": "list, len 120 = ['...']", "hits": f"list, len {rng.randint(0, 3)} = []"},
            "execution_time": round(exec_s, 4), "final_answer": None, "rlm_calls": rlm_calls,
            "state_lost": False, "timed_out": False}},
        {"code": second, "result": {"stdout": _words(rng, 6) + "\n", "stderr": "", "locals": {},
                                    "execution_time": 0.002, "final_answer": None, "rlm_calls": [],
                                    "state_lost": False, "timed_out": False}},
    ]
    if number % 97 == 0:  # now and then a failing cell, with a traceback on stderr
        blocks[1]["result"]["stderr"] = ("Traceback (most recent call last):\n  File \"<cell>\", line 1\n"
                                         "KeyError: 'missing'")
    duration = model_s + exec_s + 0.002
    return {"timestamp": clock.advance(duration), "iteration": number,
            "prompt": [{"role": "user", "content": f"Code block 1 output:\n{stdout[:2_000]}"}],
            "response": reply, "code_blocks": blocks, "final_answer": None, "iteration_time": round(duration, 4),
            "usage": {"model": "anthropic/claude-sonnet-4-5", "input_tokens": 2_000 + 40 * number,
                      "output_tokens": rng.randint(80, 900), "cost_usd": rng.uniform(0.002, 0.03)}}


def write_run(directory: Path, *, iterations: int = 1_000, subcalls: int = 10_000, children: int = 50,
              child_iterations: int = 3, status: str = "completed", with_start_times: bool = False,
              hostile: bool = False, seed: int = 7, run_id: str = "run-20260101-000000-synth1") -> Path:
    """Write a synthetic run (root + ``children`` child RLMs) and return the root file."""
    rng = random.Random(seed)
    model = "anthropic/claude-sonnet-4-5"
    query = "Which shipment carries the secret code, and who signed for it?"
    if hostile:
        query += " " + HOSTILE
    start = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    clock = _Clock(start)
    root = TrajectoryWriter(directory / f"{run_id}.jsonl", _metadata(run_id, run_id, 1, query, model))
    child_ids = [f"{run_id}.{n}" for n in range(children, 0, -1)]  # popped in order 1, 2, ...
    per_iteration = [subcalls // max(1, iterations)] * iterations
    for k in range(subcalls - sum(per_iteration)):
        per_iteration[k % iterations] += 1
    for number in range(1, iterations + 1):
        spacing = max(1, iterations // max(1, children))  # children spread evenly over the iterations
        pending_children = [child_ids.pop()] if child_ids and number % spacing == 0 else []
        names = list(pending_children)
        record = _iteration(rng, clock, number, per_iteration[number - 1], pending_children, with_start_times,
                            hostile and number == 1)
        for name in names:
            _write_child(directory, name, run_id, rng, child_iterations, with_start_times, clock)
        if number == iterations and status == "completed":
            record["final_answer"] = "Shipment 4471, signed by R. Okafor."
        root.iteration(record)
    while child_ids:  # more children than iterations: hang the rest on the last iteration's calls
        _write_child(directory, child_ids.pop(), run_id, rng, child_iterations, with_start_times, clock)
    usage = {model: {"calls": iterations, "input_tokens": sum(2_000 + 40 * n for n in range(1, iterations + 1)),
                     "output_tokens": 450 * iterations, "cost_usd": 0.016 * iterations},
             "openai/gpt-4o-mini": {"calls": subcalls, "input_tokens": 51_000 * subcalls,
                                    "output_tokens": 200 * subcalls, "cost_usd": 0.01 * subcalls}}
    outcome: dict[str, Any] = {"status": status, "iterations": iterations, "elapsed_s": round(clock.offset(), 3),
                               "usage": usage, "subcalls": subcalls, "limit": None, "error": None, "answer": None}
    if status == "completed":
        outcome["answer"] = "Shipment 4471, signed by R. Okafor." + (" " + HOSTILE if hostile else "")
    elif status == "failed":
        outcome["error"] = "model openai/gpt-4o-mini failed after 3 attempts: 503 overloaded"
    elif status == "limit_reached":
        outcome.update(limit="max_cost_usd", error="the run spent its budget of $50")
    if status != "running":
        root.finish(**outcome)
    return root.path


def _write_child(directory: Path, child_id: str, root_id: str, rng: random.Random, iterations: int,
                 with_start_times: bool, clock: _Clock) -> None:
    query = f"CHILD TASK: find the secret code in this text; answer with the code or NONE.\n\n{_words(rng, 400)}"
    writer = TrajectoryWriter(directory / f"{child_id}.jsonl",
                              _metadata(child_id, root_id, child_id.count(".") + 1, query, "openai/gpt-4o-mini"))
    own = _Clock(clock.start)  # the child runs inside its parent's cell: the parent's clock does not move
    own.now = clock.now
    for number in range(1, iterations + 1):
        writer.iteration(_iteration(rng, own, number, 2, [], with_start_times, False))
    writer.finish(status="completed", answer="NONE", limit=None, error=None, iterations=iterations,
                  elapsed_s=round(rng.uniform(2, 20), 3), usage=None, subcalls=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic RLM trajectory for the viewer")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--iterations", type=int, default=1_000)
    parser.add_argument("--subcalls", type=int, default=10_000)
    parser.add_argument("--children", type=int, default=50)
    parser.add_argument("--status", default="completed", choices=("completed", "failed", "limit_reached", "running"))
    parser.add_argument("--start-times", action="store_true", help="record sub-call start times (start_s)")
    args = parser.parse_args(argv)
    path = write_run(args.directory, iterations=args.iterations, subcalls=args.subcalls, children=args.children,
                     status=args.status, with_start_times=args.start_times)
    print(path)


if __name__ == "__main__":
    main()
