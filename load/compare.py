"""payd against its peers, back to back on one workload, with the ratios that matter.

    .venv/bin/python load/compare.py --attempts 20000 --latency-ms 50 --json load/results/compare-NAME.json

Runs ``load/bench.py`` once per system (payd, the lean asyncio pipeline, a
Celery worker; ``--systems`` picks), each on a fresh sandbox, empty tables and
queues, with the same requests, and prints one table: attempts/s end to end,
CPU microseconds per attempt of the system's own process, p50/p99 latency,
peak RSS, whether the run was clean (every attempt terminal, nothing charged
twice), and the ratios payd/peer. Absolute figures depend on the machine and
the moment; the ratios, taken minutes apart on one machine, are the result.

Every bench.py argument after ``--`` is passed through to each run.
Exit status: 0 every run clean; 1 a run failed; 3 a double charge in any run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
SYSTEMS = ("payd", "lean", "celery")

# (label, how to read it from a bench result, which way is better)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("attempts/s", "attempts_per_s", "higher"),
    ("CPU us/attempt", "cpu", "lower"),
    ("p50 ms", "p50", "lower"),
    ("p99 ms", "p99", "lower"),
    ("peak RSS MiB", "daemon_peak_rss_mib", "lower"),
)


def figure(result: dict[str, Any], key: str) -> float:
    if key == "cpu":
        return float(result["cpu_us_per_attempt"].get("daemon", float("nan")))
    if key in ("p50", "p99"):
        latency = result.get("latency_ms") or {}
        return float(latency.get(key, float("nan")))
    return float(result[key])


def run_one(system: str, attempts: int, latency_ms: float, extra: list[str], workdir: Path) -> dict[str, Any]:
    out = workdir / f"{system}.json"
    argv = [
        PYTHON,
        str(REPO / "load" / "bench.py"),
        "--system",
        system,
        "--attempts",
        str(attempts),
        "--latency-ms",
        str(latency_ms),
        "--json",
        str(out),
        *extra,
    ]
    print(f"compare: {system}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, check=False, cwd=REPO)
    if not out.exists():
        raise SystemExit(f"compare: {system} produced no result (bench.py exit {done.returncode})")
    result: dict[str, Any] = json.loads(out.read_text())
    result["bench_exit"] = done.returncode
    return result


def render(results: dict[str, dict[str, Any]]) -> str:
    systems = list(results)
    lines = [f"{'':<16}" + "".join(f"{name:>12}" for name in systems)]
    for label, key, _ in COLUMNS:
        cells = "".join(f"{figure(results[name], key):>12,.1f}" for name in systems)
        lines.append(f"{label:<16}{cells}")
    lines.append(f"{'clean run':<16}" + "".join(f"{results[n]['ok']!s:>12}" for n in systems))
    if "payd" in results:
        lines.append("")
        lines.append("payd / peer (>1 is better for payd on attempts/s, <1 on the others)")
        for peer in (name for name in systems if name != "payd"):
            ratios = "  ".join(
                f"{label} {figure(results['payd'], key) / figure(results[peer], key):.2f}"
                for label, key, _ in COLUMNS
            )
            lines.append(f"  vs {peer:<8} {ratios}")
    return "\n".join(lines)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    if "payd" not in results:
        return {}
    return {
        peer: {
            key if key != "cpu" else "cpu_us_per_attempt": round(
                figure(results["payd"], key) / figure(results[peer], key), 3
            )
            for _, key, _ in COLUMNS
        }
        for peer in results
        if peer != "payd"
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="load/compare.py",
        description="Run payd and its peers back to back on one workload; print figures and ratios.",
    )
    parser.add_argument("--attempts", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, in run order")
    parser.add_argument("--json", metavar="FILE", help="write every run's result and the ratios here")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    os.environ.setdefault("CREDENTIALS_DIRECTORY", str(REPO / ".secrets"))
    with tempfile.TemporaryDirectory(prefix="payd-compare-") as tmp:
        results = {s: run_one(s, args.attempts, args.latency_ms, extra, Path(tmp)) for s in systems}
    print(render(results))
    summary = {
        "command": " ".join(["load/compare.py", *(argv if argv is not None else sys.argv[1:])]),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": next(iter(results.values())).get("machine", {"python": platform.python_version()}),
        "ratios": ratios(results),
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"JSON written to {args.json}", file=sys.stderr)
    if any(r["bench_exit"] == 3 for r in results.values()):
        return 3  # bench.py's exit status for a double charge
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
