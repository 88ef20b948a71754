"""The benchmark report: targets (ratios against the reference in the same run), the markdown
tables, the standing notes on method, and the result files (``latest.md``/``latest.json`` plus
dated copies)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from bench import common
from bench.common import MB, MEM_DOCKER, MEM_INPROC

def _size(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= MB:
        return f"{n / MB:.1f} MB"
    return f"{n / 1024:.1f} KB"


def _num(n: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if n is None else fmt.format(n)


def find(records: list[dict[str, Any]], scenario: str, system: str) -> dict[str, Any] | None:
    return next((r for r in records if r["scenario"] == scenario and r["system"] == system and r.get("wall_s")), None)


def targets(records: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    needle = next((n for n in ("needle-100mb", "needle-10mb", "needle-1mb")
                   if any(r["scenario"] == n for r in records)), None)

    def add(name: str, mine: dict | None, ref: dict | None, key: str, limit: float, what: str, fmt: str,
            compare: str = "ratio") -> None:
        row: dict[str, Any] = {"target": name, "limit": limit, "compare": compare}
        if mine is None or ref is None:
            missing = [label for label, rec, sys_ in (("rlm-mcp", mine, None), ("reference", ref, None)) if rec is None]
            row.update(verdict="NOT MEASURED", detail=f"no result for {' and '.join(missing)}")
        else:
            a, b = _pick(mine, key), _pick(ref, key)
            broken = [(label, rec) for label, rec in (("rlm-mcp", mine), ("reference", ref))
                      if rec.get("subcall_errors")]
            holds_anyway = (a is not None and b and [label for label, _ in broken] == ["reference"]
                            and a / b <= limit)  # the reference did less work and still used more
            if broken and key in ("prompt_chars", "trajectory_bytes", "wall_median") and not holds_anyway:
                label, rec = broken[0]
                row.update(verdict="NOT COMPARABLE", mine=a, reference=b,
                           detail=f"{fmt.format(a)} vs {fmt.format(b)}, but {label} did less work: up to "
                                  f"{rec['subcall_errors']} sub-calls per run failed ({rec['subcall_error_sample']})")
            elif a is None or b is None or not b:
                row.update(verdict="NOT MEASURED", detail=f"{what} missing")
            else:
                ratio = a / b
                passed = ratio <= limit
                row.update(mine=a, reference=b, ratio=ratio, verdict="PASS" if passed else "FAIL",
                           detail=f"{fmt.format(a)} vs {fmt.format(b)} = {ratio:.3f}x (limit {limit:g}x)"
                           + (" although the reference's run had failed sub-calls" if broken else ""))
        out.append(row)

    if needle:
        label = needle + (" (quick mode)" if quick else "")
        add(f"{label}: rlm-mcp local time <= 0.25x reference local", find(records, needle, "rlm-mcp/local"),
            find(records, needle, "reference/local"), "wall_median", 0.25, "median wall time", "{:.2f} s")
        add(f"{label}: rlm-mcp docker time <= 0.1x reference docker", find(records, needle, "rlm-mcp/docker"),
            find(records, needle, "reference/docker"), "wall_median", 0.1, "median wall time", "{:.2f} s")
        add(f"{label}: server peak memory (local sandbox) <= 0.3x reference process peak (local)",
            find(records, needle, "rlm-mcp/local"), find(records, needle, "reference/local"), "process_peak_mb",
            0.3, "peak memory", "{:.0f} MB")
        add(f"{label}: server peak memory (docker sandbox) <= 0.3x reference process peak (docker)",
            find(records, needle, "rlm-mcp/docker"), find(records, needle, "reference/docker"), "process_peak_mb",
            0.3, "peak memory", "{:.0f} MB")
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        for env in ("local", "docker"):
            mine, ref = find(records, scenario, f"rlm-mcp/{env}"), find(records, scenario, f"reference/{env}")
            if mine is None and ref is None:
                continue
            add(f"{scenario} ({env}): trajectory size <= 0.1x reference", mine, ref, "trajectory_bytes", 0.1,
                "trajectory size", "{:,.0f} B")
            add(f"{scenario} ({env}): prompt chars <= reference (same policy)", mine, ref, "prompt_chars", 1.0,
                "prompt characters", "{:,.0f}", compare="<=")
    return out


def _pick(rec: dict[str, Any], key: str) -> float | None:
    if key == "wall_median":
        return rec["wall_s"]["median"] if rec.get("wall_s") else None
    return rec.get(key)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# rlm-mcp vs reference RLM (`rlms` {report['machine'].get('rlms_version') or '-'}) benchmark",
             "", f"Run {report['started_at']} in {report['duration_s'] / 60:.1f} min: `{report['command']}`", "",
             f"Machine: {common.machine_line(report['machine'])}", "",
             f"Model: scripted OpenAI-compatible server on 127.0.0.1, {report['config']['latency_ms']:g} ms per call. "
             "Wall time: rlm-mcp = `rlm_complete` call to finished result over MCP (context loaded once before, "
             "load time in its own column); API = `RlmEngine.run`; reference = `RLM.completion()` (reading the "
             "file into a Python object timed apart as its load).", "",
             "## Scenarios", "",
             "| scenario | system | n | wall s min / median / max | vs ref (median) | load s | process peak MB | "
             "sandbox peak MB | sub-calls | most in flight | prompt chars | trajectory | correct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    records = report["scenarios"]
    for rec in records:
        name = rec["scenario"] + (f" ({rec['size_note']})" if rec.get("size_note") else "")
        if rec.get("skipped"):
            lines.append(f"| {name} | {rec['system']} | 0 | {rec['system'].split('/')[0]} cannot run: "
                         f"{rec['skipped']} | | | | | | | | | |")
            continue
        wall = rec.get("wall_s")
        if not wall:
            lines.append(f"| {name} | {rec['system']} | {rec['n']} | FAILED: {cell(rec.get('error'))} "
                         "| | | | | | | | | |")
            continue
        env = rec["system"].split("/", 1)[1]
        ref = find(records, rec["scenario"], f"reference/{env}") if not rec["system"].startswith("reference") else None
        vs = f"{wall['median'] / ref['wall_s']['median']:.3f}x" if ref else "-"
        sandbox = "in process" if rec.get("sandbox_memory_method") == MEM_INPROC else _num(rec.get("sandbox_peak_mb"))
        if rec.get("sandbox_memory_method") == MEM_DOCKER and rec.get("sandbox_peak_mb") is not None:
            sandbox += " (cgroup)"
        lines.append(
            f"| {name} | {rec['system']} | {rec['n']} | {wall['min']:.2f} / {wall['median']:.2f} / {wall['max']:.2f} "
            f"| {vs} | {_num(rec.get('load_s'), '{:.2f}')} | {_num(rec.get('process_peak_mb'))} | {sandbox} "
            f"| {_num(rec.get('subcalls'))} | {_num(rec.get('max_in_flight'))} | {_num(rec.get('prompt_chars'))} "
            f"| {_size(rec.get('trajectory_bytes'))} | {rec['correct']}/{rec['n']}"
            + (f" ({cell(rec['error'])})" if rec.get("error") else "")
            + (f"; up to {rec['subcall_errors']} failed sub-calls per run: {cell(rec['subcall_error_sample'])[:120]}"
               if rec.get("subcall_errors") else "") + " |")
    lines += ["", "## Targets (ratios measured in this run)", "", "| target | measured | verdict |", "|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['detail']} | **{t['verdict']}** |")
    lines += ["", "## Micro-benchmarks", "", "| measurement | system | value | detail |", "|---|---|---|---|"]
    for m in report["micro"]:
        if m.get("error"):
            lines.append(f"| {m['micro']} | {m['system']} | cannot run | {cell(m['error'])} |")
            continue
        value = m["value"]
        if isinstance(value, dict):
            shown = f"{value['min']:.2f} / {value['median']:.2f} / {value['max']:.2f} {m['unit']} (min/med/max)"
        elif value is None:
            shown = "-"
        else:
            digits = 3 if m["unit"] == "s" else 2
            shown = f"{value:,.{digits}f} {m['unit']}" if m["unit"] != "calls" else f"{value:,} {m['unit']}"
        lines.append(f"| {m['micro']} | {m['system']} | {shown} | {cell(m.get('detail', ''))} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def cell(text: Any) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")[:300]



def standing_notes(quick: bool, machine: dict[str, Any], unavailable: dict[str, str]) -> list[str]:
    notes = [
        "daytona-emulator rows run rlm-mcp's Daytona backend (the real `daytona` SDK) against "
        "rlm_mcp/testing/daytona_emulator.py on loopback, NOT Daytona's cloud: no network round trips, sandboxes are "
        "local processes.",
        "Memory: process peak = VmHWM from /proc/<pid>/status of the rlm-mcp server (or driver) process, read "
        "at the end of the scenario (all repeats; the server also loaded the context). Local/emulated sandbox "
        "peak = highest VmHWM of any worker process (descendants running worker.py, /proc polled every 20 ms). "
        "Docker sandbox peak = highest memory.max_usage_in_bytes of the run's containers (cgroup v1, polled "
        "every 50 ms; includes page cache). The reference's local REPL runs inside its own process, so its "
        "process peak includes the sandbox.",
        "Sub-calls, most in flight and prompt chars come from the model server's counters, reset before each "
        "repeat (prompt chars = characters of all messages of all requests, root and sub-calls). Trajectory = "
        "bytes of the run's JSONL files (rlm-mcp: the run's and its children's files; reference: its "
        "RLMLogger(log_dir=...) output).",
        "Repeats: 3 (1 and 10 MB needles, documents, recursion), 2 for the 100 MB needle; rlm-mcp serves every "
        "repeat from one server process, the reference runs every repeat in one driver process.",
        "The scripted model server now disables Nagle's algorithm; before, every call on a kept-alive "
        "connection waited ~40 ms for a delayed ACK, so older figures (design notes section 2) include that "
        "artifact for both implementations.",
        "The reference's Docker image has no pip: its start-up `pip install dill requests` fails at once (the "
        "packages come from Debian), so its Docker figures exclude any package download.",
        "First rlm_complete on a fresh server pays the lazy litellm import (see micro table); timed repeats "
        "follow one warm-up run, as the reference's timed calls follow its imports.",
        f"Load average at start {machine.get('load_avg_at_start')}, at end "
        f"{machine.get('load_avg_at_end')}: other work on this 2-core machine (concurrent test runs) adds "
        "noise to wall times; compare ratios within the run.",
    ]
    if quick:
        notes.append("QUICK MODE: smaller work (only the 1 MB needle unless a bigger one is named in --scenarios; "
                     "100 documents instead of 1,000; 1 MB recursion instead of 2 MB; a 64 MB load file instead "
                     "of 1 GB; fewer micro iterations) and 1 repeat; targets are then evaluated on the sizes that "
                     "ran and do not stand for the full run.")
    for system, reason in unavailable.items():
        notes.append(f"{system} cannot run: {reason}")
    return notes


def write_results(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if report["config"]["quick"] else "")
    text = markdown(report)
    data = json.dumps(report, indent=1, default=str)
    for name, content in (("latest.md", text), ("latest.json", data), (f"{stamp}.md", text),
                          (f"{stamp}.json", data)):
        (out / name).write_text(content, encoding="utf-8")
    return out / "latest.md", out / "latest.json"

