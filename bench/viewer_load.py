"""How fast the run viewer opens a very large run, in headless Chromium.

    python bench/viewer_load.py [--iterations 1000 --subcalls 10000 --children 50] [--repeats 5] [--json]

Writes a synthetic trajectory in the engine's format (``rlm_mcp.testing.synthetic``: 1,000 root
iterations, 10,000 sub-calls, 50 child RLMs by default), builds the view-model, renders the static
page and loads it from a file:// URL in Debian's chromium through Playwright (the same launch as
the tests). Figures:

  build_view        reading the trajectory files into the view-model (Python)
  render_html       the page from the view-model (Python)
  html              page size, and gzipped
  ready             navigation start to the first render done (the viewer's own mark,
                    performance.now() at data-ready): the page answers input from here
  interactive       the later of ready and the end of the last long task (>50 ms) seen by a
                    PerformanceObserver: the main thread is free
  wall              Playwright's goto() until data-ready is seen, from Python (adds IPC)
  key j / Enter     the keydown handler for "move" and "open an iteration" (in-page timing)
  search            typing a query and pressing Enter: index build on first use, count, jump
  heap              JS heap used after load (performance.memory)

Target (issue 11): interactive < 2 s. A benchmark figure, not a test: the machine is shared.
Results also go to bench/results/viewer_load.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rlm_mcp.viewer import build_view, render_html, write_html
from rlm_mcp.testing.synthetic import write_run

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
TARGET_INTERACTIVE_MS = 2_000
RESULTS = Path(__file__).resolve().parent / "results" / "viewer_load.json"

# Installed before the page's own script runs: long tasks are recorded from the start.
OBSERVE_LONG_TASKS = """
window.__longTasks = [];
try {
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.__longTasks.push([e.startTime, e.duration]);
  }).observe({ type: "longtask", buffered: true });
} catch (e) { window.__longTasks = null; }
"""

IN_PAGE = """
async () => {
  const idle = () => new Promise((resolve) => setTimeout(resolve, 300));
  await idle();  // let trailing long tasks finish and be reported
  const tasks = window.__longTasks;
  const ready = window.__rlmViewer.readyAt;
  const lastLong = tasks && tasks.length ? Math.max(...tasks.map(([s, d]) => s + d)) : 0;
  const key = (k) => {
    const t = performance.now();
    document.dispatchEvent(new KeyboardEvent("keydown", { key: k, bubbles: true }));
    return performance.now() - t;
  };
  const j = key("j");
  const enter = key("Enter");
  const opened = document.querySelectorAll(".it-body").length;
  const input = document.getElementById("search");
  input.value = "XK-7";
  const t = performance.now();
  input.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
  const search = performance.now() - t;
  return { ready_ms: ready, interactive_ms: Math.max(ready, lastLong), long_tasks: tasks ? tasks.length : null,
           key_j_ms: j, key_enter_ms: enter, opened: opened, search_ms: search,
           search_result: document.getElementById("search-count").textContent,
           rows: document.querySelectorAll(".nav-row").length,
           heap_mb: performance.memory ? performance.memory.usedJSHeapSize / 1e6 : null };
}
"""


def measure(iterations: int, subcalls: int, children: int, repeats: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="viewer-bench-") as folder:
        directory = Path(folder)
        started = time.perf_counter()
        root = write_run(directory / "trajectories", iterations=iterations, subcalls=subcalls, children=children)
        generated_s = time.perf_counter() - started
        trajectory_mb = sum(p.stat().st_size for p in root.parent.iterdir()) / 1e6
        builds, renders = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            view = build_view(root)
            builds.append(time.perf_counter() - started)
            started = time.perf_counter()
            page_html = render_html(view)
            renders.append(time.perf_counter() - started)
        page_path = write_html(page_html, directory / "view.html")
        html_bytes = len(page_html.encode())
        gzip_bytes = len(gzip.compress(page_html.encode(), 6))
        loads: list[dict[str, Any]] = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            for _ in range(repeats):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.add_init_script(OBSERVE_LONG_TASKS)
                errors: list[str] = []
                page.on("pageerror", lambda error, seen=errors: seen.append(str(error)))
                started = time.perf_counter()
                page.goto(page_path.as_uri())
                page.wait_for_selector("html[data-ready]", timeout=60_000)
                wall_ms = (time.perf_counter() - started) * 1000
                figures = page.evaluate(IN_PAGE)
                figures["wall_ms"] = wall_ms
                if errors:
                    raise RuntimeError(f"the page failed: {errors}")
                loads.append(figures)
                context.close()
            browser.close()
    med = statistics.median
    return {
        "run": {"iterations": iterations, "subcalls": subcalls, "children": children,
                "trajectory_mb": round(trajectory_mb, 1), "generate_s": round(generated_s, 2)},
        "build_view_s": round(med(builds), 3), "render_html_s": round(med(renders), 3),
        "html_mb": round(html_bytes / 1e6, 2), "html_gzip_mb": round(gzip_bytes / 1e6, 2),
        "excerpt_caps": view["excerpts"]["caps"],
        "ready_ms": round(med(x["ready_ms"] for x in loads)),
        "interactive_ms": round(med(x["interactive_ms"] for x in loads)),
        "interactive_max_ms": round(max(x["interactive_ms"] for x in loads)),
        "wall_ms": round(med(x["wall_ms"] for x in loads)),
        "key_j_ms": round(med(x["key_j_ms"] for x in loads), 1),
        "key_enter_ms": round(med(x["key_enter_ms"] for x in loads), 1),
        "search_ms": round(med(x["search_ms"] for x in loads), 1),
        "search_result": loads[0]["search_result"],
        "nav_rows": loads[0]["rows"],
        "long_tasks": loads[0]["long_tasks"],
        "heap_mb": round(med(x["heap_mb"] for x in loads), 1) if loads[0]["heap_mb"] is not None else None,
        "repeats": repeats,
        "target_interactive_ms": TARGET_INTERACTIVE_MS,
        "chromium": CHROMIUM,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1_000)
    parser.add_argument("--subcalls", type=int, default=10_000)
    parser.add_argument("--children", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS}")
    args = parser.parse_args(argv)
    results = measure(args.iterations, args.subcalls, args.children, max(1, args.repeats))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        run = results["run"]
        print(f"run: {run['iterations']:,} iterations, {run['subcalls']:,} sub-calls, {run['children']} children, "
              f"{run['trajectory_mb']} MB of JSONL")
        print(f"build_view {results['build_view_s']} s, render_html {results['render_html_s']} s, "
              f"page {results['html_mb']} MB ({results['html_gzip_mb']} MB gzipped)")
        print(f"ready {results['ready_ms']} ms, interactive {results['interactive_ms']} ms "
              f"(max {results['interactive_max_ms']} ms; target < {TARGET_INTERACTIVE_MS} ms), "
              f"goto-to-ready wall {results['wall_ms']} ms")
        print(f"key j {results['key_j_ms']} ms, Enter (open) {results['key_enter_ms']} ms, "
              f"search {results['search_ms']} ms ({results['search_result']}), heap {results['heap_mb']} MB")
    return 0 if results["interactive_max_ms"] < TARGET_INTERACTIVE_MS else 1


if __name__ == "__main__":
    sys.exit(main())
