"""Micro-benchmark of the context store: load throughput and peak memory growth on a big file.

Generates a text file (default 1024 MB, mostly ASCII with some multi-byte characters and \\r\\n),
then loads it with ``ContextStore.load_path`` in a fresh subprocess per run, each into an empty
store. A run reports load throughput (MB/s), peak RSS growth during the load (``VmHWM`` from
/proc/self/status, else ``ru_maxrss``) and the time of a peek near the end of the file (which the
sparse index turns into a seek). Medians over the runs are reported; the target for memory
growth is under 64 MB. Temporary files are deleted at the end.

    python bench/store_micro.py                 # 1 GB, 3 runs
    python bench/store_micro.py --size-mb 256 --runs 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("store_micro")
TARGET_GROWTH_MB = 64
MB = 1024 * 1024


def peak_rss_kb() -> int:
    """Peak resident set size of this process so far, in KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak   # bytes on macOS, KiB elsewhere


def generate(path: Path, size_mb: int) -> None:
    """Write ``size_mb`` MiB of varied text in 1 MiB blocks."""
    lines = [f"{n:08d} the quick brown fox jumps over the lazy dog; caf\u00e9 \u20ac {n % 97} \u4e2d\u6587\r\n"
             for n in range(20_000)]
    block = "".join(lines).encode("utf-8")
    with open(path, "wb") as fh:
        written = 0
        target = size_mb * MB
        while written < target:
            piece = block[: min(len(block), target - written)]
            fh.write(piece)
            written += len(piece)
    # the cut may split a multi-byte character at the very end: that is fine, it is decoded with
    # replacement like any other invalid input


def child(source: str, home: str) -> None:
    """One measured load, in this fresh process; prints a JSON line for the parent."""
    from rlm_mcp.config import Settings
    from rlm_mcp.store import ContextStore

    store = ContextStore(Settings(home=Path(home), max_context_bytes=1 << 40))
    before = peak_rss_kb()
    started = time.perf_counter()
    info = store.load_path(source)
    elapsed = time.perf_counter() - started
    after = peak_rss_kb()
    started = time.perf_counter()
    page = store.peek(info.handle, int(info.characters * 0.9), 2000)
    peek_s = time.perf_counter() - started
    assert len(page.text) == 2000
    sys.stdout.write(json.dumps({"seconds": elapsed, "bytes": info.bytes, "characters": info.characters,
                                 "growth_kb": after - before, "peek_s": peek_s}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the generated file (MiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to put the temporary files (default: system temp)")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "HOME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = []
    with tempfile.TemporaryDirectory(prefix="rlm-store-bench-", dir=args.dir) as tmp:
        source = Path(tmp) / "big.txt"
        log.info("generating %d MB in %s ...", args.size_mb, source)
        generate(source, args.size_mb)
        for run in range(args.runs):
            home = Path(tmp) / f"home{run}"
            out = subprocess.run([sys.executable, __file__, "--child", str(source), str(home)],
                                 env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                log.error("run %d failed:\n%s", run + 1, out.stderr)
                return 1
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            shutil.rmtree(home, ignore_errors=True)
            log.info("run %d: %.1f MB/s, peak RSS growth %.1f MB, peek at 90%% %.1f ms", run + 1,
                     result["bytes"] / MB / result["seconds"], result["growth_kb"] / 1024, result["peek_s"] * 1000)
    speed = statistics.median(r["bytes"] / MB / r["seconds"] for r in results)
    growth = statistics.median(r["growth_kb"] / 1024 for r in results)
    peek_ms = statistics.median(r["peek_s"] * 1000 for r in results)
    log.info("median of %d runs on %d MB: %.1f MB/s, peak RSS growth %.1f MB (target < %d MB: %s), "
             "peek near the end %.1f ms", len(results), args.size_mb, speed, growth, TARGET_GROWTH_MB,
             "met" if growth < TARGET_GROWTH_MB else "NOT met", peek_ms)
    return 0 if growth < TARGET_GROWTH_MB else 1


if __name__ == "__main__":
    sys.exit(main())
