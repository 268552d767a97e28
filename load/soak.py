"""Soak: N minutes of paced, mixed traffic through a real ``payd run``; does anything creep?

Not a throughput benchmark (``load/bench.py`` is): it holds a steady rate with
a realistic token mix (declines, provider errors, 429s and timeouts that go
through reconciliation) and samples the daemon every few seconds:

- resident memory (``VmRSS``) and open file descriptors, from /proc;
- event-loop lag: the round trip of ``GET /healthz``, whose handler does no
  work, so on loopback its time is the wait for the daemon's event loop;
- outbox lag: the age of the oldest row in ``outbox`` (what the relay has yet
  to publish), read from MySQL, beside ``payd_outbox_lag_seconds`` as the
  daemon reports it (that gauge is refreshed only when the relay empties the
  outbox, so while it is behind it shows an old value).

It reports each at the start (the first sample after ``--warmup-s``) and at
the end of the publishing window, their maxima, and the whole timeline in
the JSON. Leaks show as end well above start at the same rate. Same
services, database (``payd_bench``) and lock as ``load/bench.py``.

    .venv/bin/python load/soak.py --minutes 10 --rate 200 --json load/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from benchkit import procfs, services, traffic

# Roughly what a subscription business sees: most renewals pass, some soft declines
# (dunning retries them), a few hard declines, provider errors, 429s and timeouts.
REALISTIC_MIX = "pm_ok=88,pm_insufficient_funds=6,pm_stolen=2,pm_error=2,pm_rate_limited=1,pm_timeout=1"
_OUTBOX_LAG = re.compile(r"^payd_outbox_lag_seconds (\S+)$", re.MULTILINE)


@dataclass
class Sample:
    at_s: float
    rss_mib: float
    fds: int
    loop_lag_ms: float
    outbox_lag_s: float
    outbox_lag_gauge_s: float
    finished: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to publish (default 10)")
    parser.add_argument(
        "--rate", type=float, default=200.0, help="attempts published per second (default 200)"
    )
    parser.add_argument("--latency-ms", type=float, default=50.0, help="sandbox mean latency (default 50)")
    parser.add_argument("--mix", default=REALISTIC_MIX, help=f"token weights (default {REALISTIC_MIX})")
    parser.add_argument("--max-in-flight", type=int, default=500)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="the provider's timeout_s (default 5)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="the start sample is the first after it")
    parser.add_argument("--settle-s", type=float, default=180.0, help="wait this long for the last outcomes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write the result here (default: stdout)")
    args = parser.parse_args(argv)
    args.mix = traffic.parse_mix(args.mix)
    return args


async def loop_lag_ms(session: aiohttp.ClientSession, control_url: str) -> float:
    """Median /healthz round trip of three (one slow scheduling hiccup is not lag)."""
    times = []
    for _ in range(3):
        started = time.monotonic()
        async with session.get(f"{control_url}/healthz") as response:
            await response.read()
        times.append((time.monotonic() - started) * 1000)
    return statistics.median(times)


async def outbox_lag_gauge_s(session: aiohttp.ClientSession, control_url: str) -> float:
    async with session.get(f"{control_url}/metrics") as response:
        match = _OUTBOX_LAG.search(await response.text())
    return float(match.group(1)) if match else float("nan")


def outbox_lag_s() -> float:
    """Age of the oldest unpublished event, from the table itself (0 when it is empty)."""
    connection = services.connect_mysql()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT TIMESTAMPDIFF(MICROSECOND, MIN(created_at), NOW(6)) FROM outbox")
            row = cursor.fetchone()
    finally:
        connection.close()
    return (row[0] or 0) / 1_000_000 if row else 0.0


async def take_sample(
    session: aiohttp.ClientSession, control_url: str, pid: int, started: float, tracker: traffic.Tracker
) -> Sample:
    return Sample(
        at_s=round(time.monotonic() - started, 1),
        rss_mib=round((procfs.status_kib(pid, "VmRSS") or 0) / 1024, 1),
        fds=procfs.open_fds(pid),
        loop_lag_ms=round(await loop_lag_ms(session, control_url), 2),
        outbox_lag_s=round(await asyncio.to_thread(outbox_lag_s), 3),
        outbox_lag_gauge_s=round(await outbox_lag_gauge_s(session, control_url), 3),
        finished=tracker.finished,
    )


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    code = services.working_tree()
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    count = int(args.rate * args.minutes * 60)
    bodies, _ = traffic.build_requests(run_id, count, args.mix, args.seed)
    tracker = traffic.Tracker(run_id=run_id, count=count)
    services.raise_fd_limit(args.max_in_flight + 1024)
    sandbox, sandbox_port = await services.start_sandbox(
        code,
        workdir,
        latency_ms=args.latency_ms,
        latency_dist="lognormal",
        hang_s=args.timeout_s + 5,
        seed=args.seed,
    )
    daemon: services.ManagedProcess | None = None
    try:
        control_port = services.free_port()
        control_url = f"http://127.0.0.1:{control_port}"
        config_path = workdir / "config.toml"
        settings = services.DaemonSettings(
            control_port=control_port,
            sandbox_port=sandbox_port,
            max_in_flight=args.max_in_flight,
            timeout_s=args.timeout_s,
            prefetch=min(65535, 2 * args.max_in_flight),
            batch_size=250,
            pool_size=8,
            drain_timeout_s=30,
        )
        services.write_config(code, config_path, settings)
        services.run_migrate(code, config_path)
        services.truncate_tables()
        await services.purge_queues()
        daemon = services.start_daemon(code, workdir, config_path)
        await services.wait_ready(daemon, control_url)
        connection = await aio_pika.connect(
            services.amqp_url(), client_properties={"connection_name": "payd-soak"}
        )
        samples: list[Sample] = []
        try:
            await traffic.consume_events(connection, f"{services.NAMESPACE}.events", tracker)
            started = time.monotonic()
            publishing = asyncio.create_task(
                traffic.publish_requests(
                    connection, f"{services.NAMESPACE}.attempts", bodies, tracker, rate=args.rate, window=1000
                )
            )
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                while not publishing.done():
                    await asyncio.wait({publishing}, timeout=args.sample_s)
                    samples.append(await take_sample(session, control_url, daemon.pid, started, tracker))
                    print(json.dumps(asdict(samples[-1])), file=sys.stderr, flush=True)
                publish_stats = publishing.result()
                with_settling = asyncio.create_task(tracker.all_finished.wait())
                await asyncio.wait({with_settling}, timeout=args.settle_s)
                with_settling.cancel()
                after = await take_sample(session, control_url, daemon.pid, started, tracker)
        finally:
            await connection.close()
        exit_code, drain_s = await daemon.stop(60)
    finally:
        if daemon is not None:
            daemon.kill()
        sandbox.kill()
    start = next((s for s in samples if s.at_s >= args.warmup_s), samples[0])
    end = samples[-1]

    def summary(name: str) -> dict[str, float]:
        values = [getattr(s, name) for s in samples]
        return {"start": getattr(start, name), "end": getattr(end, name), "max": max(values)}

    return {
        "kind": "soak",
        "run_id": run_id,
        "payd": code.facts,
        "params": {k: v for k, v in vars(args).items() if k != "json"},
        "published": tracker.published,
        "finished": tracker.finished,
        "events": dict(tracker.events),
        "publish_max_lag_s": round(publish_stats.max_lag_s, 3),
        "rss_mib": summary("rss_mib"),
        "fds": summary("fds"),
        "loop_lag_ms": summary("loop_lag_ms"),
        "outbox_lag_s": summary("outbox_lag_s"),
        "outbox_lag_gauge_s": summary("outbox_lag_gauge_s"),
        "after_settling": asdict(after),
        "drain": {"exit_code": exit_code, "seconds": round(drain_s, 1)},
        "timeline": [asdict(s) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lock = services.DatabaseLock()
    workdir = Path(tempfile.mkdtemp(prefix="payd-soak-"))
    try:
        lock.acquire()
        result = asyncio.run(soak(args, workdir))
    except services.BenchError as error:
        print(f"soak: {error} (logs in {workdir})", file=sys.stderr)
        return 2
    finally:
        lock.release()
    shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    for name in ("rss_mib", "fds", "loop_lag_ms", "outbox_lag_s", "outbox_lag_gauge_s"):
        print(
            f"{name:>18}: start {result[name]['start']}, end {result[name]['end']}, max {result[name]['max']}"
        )
    ok = result["finished"] == result["published"] and result["drain"]["exit_code"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
