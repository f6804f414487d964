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

BENCHES = ["bench.bench_hotpath", "bench.bench_loaded", "bench.bench_loop", "bench.bench_peer", "bench.bench_ingest",
           "bench.bench_dash", "bench.bench_archive", "bench.bench_footprint"]
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
RESULTS = DOC.with_suffix(".json")


def run(module: str, quick: bool) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", module, *(["--quick"] if quick else [])]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    for item in out:
        print(json.dumps(item), flush=True)
    return out


def _row(name: str, p: dict[str, Any]) -> str:
    return f"| {name} | {p['p50_us']} | {p['p99_us']} | {p['p999_us']} | {p['max_us']} |"


def _tight_row(name: str, t: dict[str, Any]) -> str:
    return f"| {name} | {t['calls_per_s']} | {t['p50_us']} | {t['p99_us']} | {t['p999_us']} | {t['max_us']} |"


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
                _row(f"dashcar, agent up, coalescing {r['coalesce_ms']:g} ms", r["sdk_agent_up_coalesced"]["paced"]),
                _row("dashcar, agent down (killed mid-run)", r["sdk_agent_down"]["paced"]),
                _row("dashcar, agent absent", r["sdk_agent_absent"]["paced"]),
                "",
                f"Ratio dashcar / raw at p50: **{r['paced_ratio_sdk_over_raw']['p50_us']}**, "
                f"at p99: **{r['paced_ratio_sdk_over_raw']['p99_us']}**.",
                "",
                "Other calls, paced the same way, each against a raw send of an equivalent dict:",
                "",
                "| call | p50 µs | p99 µs | p99.9 µs | max µs | ratio at p50 / p99 |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            others = (("`metrics(\"train\").log` of 3 scalars", "sdk_metric", "raw_metric"),
                      ("`log(...)` with metadata", "sdk_log", "raw_log"))
            for name, sdk, raw in others:
                if sdk in r:
                    d, w = r[sdk]["paced"], r[raw]["paced"]
                    lines.append(f"{_row(name, d)} {d['p50_us'] / w['p50_us']:.2f} / {d['p99_us'] / w['p99_us']:.2f} |")
                    lines.append(f"{_row('raw equivalent', w)} |")
            lines += [
                "",
                "Tight loop (as fast as possible):",
                "",
                "| path | calls/s | p50 µs | p99 µs | p99.9 µs | max µs |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for name, key in (("raw", "raw"), ("dashcar, agent up", "sdk_agent_up"),
                              ("dashcar, agent up, coalescing", "sdk_agent_up_coalesced"),
                              ("dashcar, agent down", "sdk_agent_down"), ("dashcar, agent absent", "sdk_agent_absent")):
                lines.append(_tight_row(name, r[key]["tight"]))
            if "array_1000_sdk" in r:
                arrays = (("raw, a 1000-float array (`tolist`)", "array_1000_raw"),
                          ("dashcar, a 1000-float array (raw bytes)", "array_1000_sdk"))
                for name, key in arrays:
                    lines.append(_tight_row(name, r[key]))
            lines.append("")
        if r["bench"] == "loaded":
            lines += [
                f"## Call cost at 1 kHz while the agent is busy ({r['agent_frames_per_s_during']} frames/s from two "
                "other producers)",
                "",
                f"Interleaved one-second turns, {r['seconds_per_path']} per path, against the raw path in the same run.",
                "",
                "| path | p50 µs | p99 µs | p99.9 µs | max µs |",
                "| --- | --- | --- | --- | --- |",
                _row("raw pyzmq+msgpack", r["raw"]),
                _row("dashcar", r["dashcar"]),
                _row("dashcar, coalescing", r["dashcar_coalesced"]),
                "",
            ]
    for r in results:
        if r["bench"] == "loop":
            lines += [
                f"## A 1 kHz control loop ({r['seconds']:.0f} s): period error, and freshness",
                "",
                "| | p50 µs | p99 µs | p99.9 µs | max µs |",
                "| --- | --- | --- | --- | --- |",
                _row("period error, no logging", r["jitter_bare"]),
                _row("period error, logging a 6-DOF state per cycle", r["jitter_logging"]),
                _row("append → readable after flush()", r["freshness"]),
                "",
            ]
        if r["bench"] == "peer":
            lines += [
                f"## Against the reference ml-dash client (local mode, {r['calls']} calls at 1 kHz)",
                "",
                "| client | p50 µs | p99 µs | p99.9 µs | max µs | rows on disk after SIGKILL ~1 s in |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for name in ("ml_dash", "dashcar", "dashcar_coalesced"):
                p = r[name]["paced"]
                lines.append(f"| {name} | {p['p50_us']} | {p['p99_us']} | {p['p999_us']} | {p['max_us']} | "
                             f"{r[name]['rows_on_disk_after_sigkill_at_1s']} |")
            lines.append("")
        if r["bench"] == "footprint":
            lines += ["## Footprint", "", "| what | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in r.items() if k != "bench"]
            lines.append("")
    ingest = [r for r in results if r["bench"] == "ingest"]
    naive = next((r for r in results if r["bench"] == "naive"), None)
    drain = next((r for r in results if r["bench"] == "drain"), None)
    if ingest:
        lines += ["## Agent throughput", ""]
        if naive:
            lines += [
                f"The naive pipeline in the same run (raw `packb` + PUSH from {naive['producers']} processes → one PULL "
                f"process → an orjson line per frame, no durability, no merge, no checks): "
                f"**{naive['frames_per_s']} frames/s** over {naive['frames']} frames.",
                "",
            ]
        lines += [
            "| producers | frames | into WAL frames/s | into merged JSONL frames/s | JSONL / naive | dropped | missing "
            "| agent RssAnon peak MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in ingest:
            who = f"{r['producers']}" + (f", coalescing {r['coalesce_ms']:g} ms" if r.get("coalesce_ms") else "")
            lines.append(
                f"| {who} | {r['frames']} | {r['wal_frames_per_s']} | {r['jsonl_frames_per_s']} | {r.get('vs_naive', '')} | "
                f"{r['dropped_by_producers']} | {r['missing']} | {r['agent_rss_anon_mb_peak']} |"
            )
        lines.append("")
        if drain:
            lines += [
                f"A backlog of {drain['frames']} frames already in the WAL drains into JSONL at **{drain['frames_per_s']} "
                f"frames/s** ({drain['seconds']} s from the agent's start).",
                "",
            ]
    dash = next((r for r in results if r["bench"] == "dash"), None)
    backlog = next((r for r in results if r["bench"] == "dash_backlog"), None)
    if dash:
        lines += [
            "## Shipping to an ML-Dash server",
            "",
            f"{dash['producers']} producers log {dash['frames']} 6-DOF track rows; the agent writes JSONL and sends every run to "
            "the recording ML-Dash server of the tests (its own process, on loopback) at once. Rates are frames over the time "
            "from the first frame until all of them are written (JSONL) or held by the server, run statuses included.",
            "",
            "| shipped to the server frames/s | JSONL frames/s, same run | JSONL frames/s, no server | requests | dropped |",
            "| --- | --- | --- | --- | --- |",
            f"| {dash['dash_frames_per_s']} | {dash['jsonl_frames_per_s']} | {dash['jsonl_alone_frames_per_s']} | "
            f"{dash['requests']} | {dash['dropped_by_producers']} |",
            "",
        ]
        if backlog:
            lines += [f"A backlog of {backlog['frames']} frames logged while the server was down reaches it at "
                      f"**{backlog['rows_per_s']} rows/s** once it starts ({backlog['seconds']} s).", ""]
    archive = next((r for r in results if r["bench"] == "archive"), None)
    if archive:
        lines += [
            "## Shipping to object storage (Parquet on a loopback S3 server)",
            "",
            f"A backlog of {archive['frames']} 6-DOF track frames in the WAL, drained by an agent with the JSONL and the "
            "archive sinks, the archive shipping Parquet (zstd) to moto's S3 server in another process; then the same "
            "backlog drained by JSONL alone.",
            "",
            "| | frames/s | agent RssAnon peak MB |",
            "| --- | --- | --- |",
            f"| archive → S3 | **{archive['archive_frames_per_s']}** | {archive['agent_rss_anon_mb_peak']} |",
            f"| JSONL, same run | {archive['jsonl_frames_per_s']} | |",
            f"| JSONL alone | {archive['jsonl_alone_frames_per_s']} | {archive['jsonl_alone_rss_anon_mb_peak']} |",
            "",
            f"{archive['objects']} Parquet objects, {archive['parquet_mb']} MB in all, the largest "
            f"{archive['object_mb_max']} MB (one PUT each).",
            "",
        ]
    lines += ["![call cost](bench_latency.png)", "", "![ingest](bench_ingest.png)", ""]
    lines += goals(results)
    return "\n".join(lines)


def goals(results: list[dict[str, Any]]) -> list[str]:
    """The goals of ``DESIGN.md`` §4 next to this run's figures."""
    by = {r["bench"]: r for r in results if r["bench"] != "ingest"}
    coalesced = next((r for r in results if r["bench"] == "ingest" and r.get("coalesce_ms")), None)
    ingest = {r["producers"]: r for r in results if r["bench"] == "ingest" and not r.get("coalesce_ms")}
    rows: list[tuple[str, str, bool | None]] = []
    if "hotpath" in by:
        h = by["hotpath"]
        ratio = h["paced_ratio_sdk_over_raw"]
        rows.append(("paced p50 and p99 ≤ 1.3× raw", f"{ratio['p50_us']}× / {ratio['p99_us']}×", max(ratio.values()) <= 1.3))
        for key, name in (("sdk_agent_up", "up"), ("sdk_agent_down", "down")):
            mx = h[key]["paced"]["max_us"]
            rows.append((f"paced max over the run ≤ 1 ms (agent {name}; raw path: {h['raw']['paced']['max_us']} µs)",
                         f"{mx} µs", mx <= 1000))
        raw = h["raw"]["paced"]
        for key, name in (("sdk_agent_up", "idle"), ("sdk_agent_down", "down")):
            d = h[key]["paced"]
            rows.append((f"agent {name}: p99.9 and max ≤ 2× raw (raw {raw['p999_us']} / {raw['max_us']} µs)",
                         f"{d['p999_us']} / {d['max_us']} µs",
                         d["p999_us"] <= 2 * raw["p999_us"] and d["max_us"] <= 2 * raw["max_us"]))
        cps = h["sdk_agent_up"]["tight"]["calls_per_s"]
        rows.append(("tight loop ≥ 300 000 calls/s", f"{cps}", cps >= 300_000))
    if "peer" in by:
        p = by["peer"]
        ml = p["ml_dash"]["paced"]
        for key in ("dashcar", "dashcar_coalesced"):
            d = p[key]["paced"]
            rows.append((f"{key} p50 ≤ ml-dash buffered p50 ({ml['p50_us']} µs)", f"{d['p50_us']} µs",
                         d["p50_us"] <= ml["p50_us"]))
            rows.append((f"{key} p99.9 < ml-dash p99.9 ({ml['p999_us']} µs)", f"{d['p999_us']} µs",
                         d["p999_us"] < ml["p999_us"]))
    if 4 in ingest:
        r = ingest[4]
        rows.append(("4 producers → WAL ≥ 300 000 frames/s", f"{r['wal_frames_per_s']}",
                     (r["wal_frames_per_s"] or 0) >= 300_000))
        if "naive" in by:
            rows.append((f"→ merged JSONL ≥ 0.6× the naive pipeline ({by['naive']['frames_per_s']} frames/s), no drops",
                         f"{r['jsonl_frames_per_s']} = {r.get('vs_naive')}×, {r['dropped_by_producers']} dropped",
                         r.get("vs_naive", 0) >= 0.6 and r["dropped_by_producers"] == 0))
        rows.append(("→ merged JSONL ≥ 150 000 frames/s (stretch)", f"{r['jsonl_frames_per_s']}",
                     r["jsonl_frames_per_s"] >= 150_000))
        if coalesced:
            rows.append(("the same with 2 ms coalescing, ≥ 0.6× naive", f"{coalesced['jsonl_frames_per_s']} = "
                         f"{coalesced.get('vs_naive')}×", coalesced.get("vs_naive", 0) >= 0.6))
    if "drain" in by:
        d = by["drain"]["frames_per_s"]
        rows.append(("a WAL backlog drains ≥ 300 000 frames/s", f"{d}", d >= 300_000))
    if "dash" in by:
        r = by["dash"]
        shipped, jsonl, alone = r["dash_frames_per_s"] or 0, r["jsonl_frames_per_s"] or 0, r["jsonl_alone_frames_per_s"] or 0
        rows.append(("shipping to a loopback ML-Dash server ≥ 50 000 frames/s", f"{shipped}", shipped >= 50_000))
        rows.append(("while JSONL keeps its rate (≥ 0.9× its rate with no server, same run)",
                     f"{jsonl} vs {alone} = {jsonl / alone if alone else 0:.2f}×", jsonl >= 0.9 * alone))
    if "archive" in by:
        a = by["archive"]
        rows.append(("Parquet to a loopback S3 server ≥ 150 000 frames/s",
                     f"{a['archive_frames_per_s']} (JSONL {a['jsonl_frames_per_s']} in the same run, "
                     f"{a['jsonl_alone_frames_per_s']} alone)", (a["archive_frames_per_s"] or 0) >= 150_000))
    if "loaded" in by:
        ld = by["loaded"]
        for key in ("dashcar", "dashcar_coalesced"):
            q = ld["ratio_over_raw"][key]
            rows.append((f"{key}, agent busy: p99.9 and max ≤ 2× raw (raw {ld['raw']['p999_us']} / {ld['raw']['max_us']} µs)",
                         f"{ld[key]['p999_us']} / {ld[key]['max_us']} µs = {q['p999_us']}× / {q['max_us']}×",
                         q["p999_us"] <= 2 and q["max_us"] <= 2))
    if "loop" in by:
        f = by["loop"]["freshness"]["p99_us"]
        rows.append(("freshness p99 ≤ 50 ms", f"{f / 1000:.1f} ms", f <= 50_000))
    if "footprint" in by:
        fp = by["footprint"]
        rows.append((f"agent RssAnon with a {fp['backlog_frames']}-frame backlog ≤ 150 MB", f"{fp['rss_with_backlog_mb']} MB",
                     fp["rss_with_backlog_mb"] <= 150))
        rows.append(("`import dashcar` ≤ 60 ms", f"{fp['import_ms']} ms", fp["import_ms"] <= 60))
    if not rows:
        return []
    out = ["## Goals", "", "| goal | this run | met |", "| --- | --- | --- |"]
    out += [f"| {g} | {v} | {'yes' if ok else 'no'} |" for g, v, ok in rows]
    out += ["", "Where the time goes, and why the unmet goals stand where they do: [performance.md](performance.md).", ""]
    return out


def charts(results: list[dict[str, Any]]) -> None:
    """Bar charts of the latency percentiles and the ingest rates, next to the tables."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; charts skipped", file=sys.stderr)
        return
    series: dict[str, dict[str, float]] = {}
    for r in results:
        if r["bench"] == "hotpath":
            series["raw pyzmq+msgpack"] = r["raw"]["paced"]
            series["dashcar (agent up)"] = r["sdk_agent_up"]["paced"]
            series["dashcar (coalescing)"] = r["sdk_agent_up_coalesced"]["paced"]
            series["dashcar (agent absent)"] = r["sdk_agent_absent"]["paced"]
        if r["bench"] == "peer":
            series["ml-dash (buffered)"] = r["ml_dash"]["paced"]
    if series:
        fig, ax = plt.subplots(figsize=(8, 4))
        keys = ["p50_us", "p99_us", "p999_us"]
        width = 0.8 / len(series)
        for i, (name, p) in enumerate(series.items()):
            ax.bar([k + i * width for k in range(len(keys))], [p[k] for k in keys], width, label=name)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], ["p50", "p99", "p99.9"])
        ax.set_ylabel("µs per call, paced 1 kHz")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(DOC.parent / "bench_latency.png", dpi=100)
        plt.close(fig)
    ingest = [r for r in results if r["bench"] == "ingest"]
    if ingest:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [str(r["producers"]) + (" (coalescing)" if r.get("coalesce_ms") else "") for r in ingest]
        ax.bar([i - 0.2 for i in range(len(xs))], [r["wal_frames_per_s"] or 0 for r in ingest], 0.4, label="into WAL")
        ax.bar([i + 0.2 for i in range(len(xs))], [r["jsonl_frames_per_s"] for r in ingest], 0.4, label="into merged JSONL")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel("producer processes")
        ax.set_ylabel("frames/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(DOC.parent / "bench_ingest.png", dpi=100)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--only", nargs="+", choices=[b.split("_", 1)[1] for b in BENCHES],
                    help="run these; keep the other figures from the last run's docs/benchmarks.json")
    args = ap.parse_args()
    modules = [b for b in BENCHES if not args.only or b.split("_", 1)[1] in args.only]
    fresh = {m: run(m, args.quick) for m in modules}
    kept = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {}
    merged = {m: fresh.get(m, kept.get(m, [])) for m in BENCHES}
    results = [item for m in BENCHES for item in merged[m]]
    if not args.no_write:
        DOC.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(merged, indent=1))
        DOC.write_text(render(results, args.quick))
        charts(results)
        print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
