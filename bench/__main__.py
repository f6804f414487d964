"""Run every benchmark, print their JSON, and write the figures to ``docs/benchmarks.md``.

    python -m bench            # full run (minutes)
    python -m bench --quick    # smoke run (under a minute); CI runs it with --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._util import git_commit

BENCHES = ["bench.bench_hotpath", "bench.bench_ingest"]
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def run(module: str, quick: bool) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", module, *(["--quick"] if quick else [])]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    for item in out:
        print(json.dumps(item), flush=True)
    return out


def _row(name: str, p: dict[str, Any]) -> str:
    return f"| {name} | {p['p50_us']} | {p['p99_us']} | {p['p999_us']} | {p['max_us']} |"


def render(results: list[dict[str, Any]], quick: bool) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Last run: commit `{git_commit()}`, {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}{' (quick mode)' if quick else ''}.",
        "Reproduce with `python -m bench` from the repository root (after the README's setup).",
        "",
    ]
    for r in results:
        if r["bench"] == "hotpath":
            lines += [
                f"## Call cost, paced {r['rate_hz']:.0f} Hz for {r['seconds']:.0f} s (6-DOF `tracks(...).append`)",
                "",
                "| path | p50 µs | p99 µs | p99.9 µs | max µs |",
                "| --- | --- | --- | --- | --- |",
                _row("raw pyzmq + msgpack (same run)", r["raw"]["paced"]),
                _row("dashcar, agent up", r["sdk_agent_up"]["paced"]),
                _row("dashcar, agent absent", r["sdk_agent_absent"]["paced"]),
                "",
                f"Ratio dashcar / raw at p50: **{r['paced_ratio_sdk_over_raw']['p50_us']}**, "
                f"at p99: **{r['paced_ratio_sdk_over_raw']['p99_us']}**.",
                "",
                "Tight loop (as fast as possible):",
                "",
                "| path | calls/s | p50 µs | p99 µs | p99.9 µs | max µs |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for name, key in (("raw", "raw"), ("dashcar, agent up", "sdk_agent_up"), ("dashcar, agent absent", "sdk_agent_absent")):
                t = r[key]["tight"]
                lines.append(f"| {name} | {t['calls_per_s']} | {t['p50_us']} | {t['p99_us']} | {t['p999_us']} | {t['max_us']} |")
            lines.append("")
    ingest = [r for r in results if r["bench"] == "ingest"]
    if ingest:
        lines += [
            "## Agent ingest",
            "",
            "| producers | frames | into WAL frames/s | into merged JSONL frames/s | dropped | missing | agent RssAnon peak MB |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in ingest:
            lines.append(
                f"| {r['producers']} | {r['frames']} | {r['wal_frames_per_s']} | {r['jsonl_frames_per_s']} | "
                f"{r['dropped_by_producers']} | {r['missing']} | {r['agent_rss_anon_mb_peak']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    results = [item for module in BENCHES for item in run(module, args.quick)]
    if not args.no_write:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(render(results, args.quick))
        print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
