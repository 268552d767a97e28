"""End-to-end benchmark of ``payd run`` through real RabbitMQ, MariaDB and the sandbox gateway.

    .venv/bin/python load/bench.py --attempts 20000 --latency-ms 50 --json load/results/NAME.json

One command: starts the sandbox and a daemon on free loopback ports with a
temporary config, publishes N attempt requests with confirms, times each one
until its terminal ``payment.*`` event, samples the daemon's CPU from /proc,
drains the daemon with SIGTERM, checks the sandbox ledger for double charges,
and prints a table plus JSON. See load/README.md for every flag and metric.

Exit status: 0 all good; 1 the run finished badly (attempts missing, the
daemon exited non-zero, timeout or stall, traffic of another program);
2 it could not start; 3 DOUBLE CHARGE.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import msgspec
import uvloop
from benchkit import peers, procfs, services, stacks, traffic
from benchkit.report import (
    LedgerCheck,
    Result,
    Shutdown,
    check_ledger,
    daemon_outbox_lag,
    latency_summary,
    render_text,
    steady_rate,
)
from benchkit.services import BenchError, ManagedProcess

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_DOUBLE_CHARGE = 0, 1, 2, 3
PUBLISH_WINDOW = 1000
"""Unconfirmed publishes at once: enough to keep RabbitMQ busy, bounded in memory."""


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="load/bench.py",
        description="Benchmark payd end to end on loopback (RabbitMQ, MariaDB, sandbox gateway).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--attempts", type=int, default=20_000, help="attempt requests to publish")
    add(
        "--system",
        choices=peers.SYSTEMS,
        default="payd",
        help="what to measure: payd, or a peer doing the same job (load/peers/)",
    )
    add("--celery-threads", type=int, default=200, help="--system celery: the threads pool's size")
    add("--latency-ms", type=float, default=50.0, help="mean latency the sandbox adds to each charge")
    add(
        "--latency-dist",
        choices=["fixed", "uniform", "exponential", "lognormal"],
        default="fixed",
        help="shape of the sandbox latency (mean is --latency-ms)",
    )
    add("--max-in-flight", type=int, default=2000, help="the sandbox provider's max_in_flight")
    add("--rate", type=float, default=0.0, help="publish at this many requests/s; 0 = as fast as possible")
    add("--prefetch", type=int, default=None, help="RabbitMQ prefetch (default: 2 x max-in-flight, <= 65535)")
    add("--batch-size", type=int, default=250, help="claim_batch_size and record_batch_size")
    add("--pool-size", type=int, default=8, help="MySQL pool_size")
    add(
        "--batch-delay-ms",
        type=float,
        default=None,
        help="how long a batch waits for company: payd's pipeline.batch_delay_ms, the lean pipeline's "
        "record wait (default: each one's own, 5 and 2 ms)",
    )
    add("--timeout-s", type=float, default=None, help="provider timeout_s (default: max(10, 10 x latency))")
    add(
        "--mix",
        default="pm_ok=1",
        help="payment method tokens and weights, e.g. pm_ok=90,pm_stolen=5,pm_error=5",
    )
    add("--seed", type=int, default=1, help="seed for the token mix and the sandbox")
    add(
        "--timeout",
        type=float,
        default=600.0,
        help="give up when the run has not finished after this long (s)",
    )
    add("--json", metavar="FILE", default=None, help="write the JSON result here instead of a stdout line")
    add(
        "--profile",
        metavar="FILE",
        default=None,
        help="py-spy record the daemon during the run (.svg flame graph, .txt collapsed stacks, "
        ".json speedscope)",
    )
    add("--profile-seconds", type=float, default=20.0, help="how long py-spy records")
    add(
        "--keep-running",
        action="store_true",
        help="after measuring, leave daemon and sandbox up until Ctrl-C, then drain and check",
    )
    add(
        "--rev",
        default=None,
        help="benchmark daemon/ as of this git revision (extracted with git archive) instead of the "
        "working tree, so edits in progress do not move the figures",
    )
    add(
        "--keep-logs", action="store_true", help="keep the run's directory (config, logs) even when it passed"
    )
    add("--quiet", action="store_true", help="no progress lines on stderr")
    add(
        "--probe-status-ms",
        type=float,
        default=0.0,
        help="also time GET /status and read the daemon's VmRSS every MS ms through the window "
        "(0: off); summarised over the samples taken with the provider at its max_in_flight",
    )
    return parser


@dataclass(frozen=True, kw_only=True)
class Options:
    """The command line, checked, with the derived defaults (prefetch, provider timeout) worked out."""

    attempts: int
    system: str
    celery_threads: int
    latency_ms: float
    latency_dist: str
    max_in_flight: int
    rate: float
    prefetch: int
    batch_size: int
    pool_size: int
    timeout_s: float
    mix: dict[str, float]
    seed: int
    timeout: float
    json: str | None
    profile: str | None
    profile_seconds: float
    keep_running: bool
    rev: str | None
    keep_logs: bool
    quiet: bool
    probe_status_ms: float = 0.0
    batch_delay_ms: float | None = None
    drain_timeout_s: float = 30.0

    @classmethod
    def from_args(cls, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
        if not 1 <= args.attempts <= 1_000_000:
            parser.error("--attempts must be between 1 and 1,000,000 (bounded counts)")
        # The ranges payd's config accepts (daemon/config.py), checked here to fail before starting anything.
        checks = (
            (1 <= args.max_in_flight <= 100_000, "--max-in-flight must be 1..100000"),
            (args.prefetch is None or 1 <= args.prefetch <= 65535, "--prefetch must be 1..65535"),
            (1 <= args.batch_size <= 5000, "--batch-size must be 1..5000"),
            (2 <= args.pool_size <= 200, "--pool-size must be 2..200"),
            (
                args.batch_delay_ms is None or 0 <= args.batch_delay_ms <= 1000,
                "--batch-delay-ms must be 0..1000",
            ),
            (args.rate >= 0 and args.latency_ms >= 0, "--rate and --latency-ms must be >= 0"),
            (args.timeout > 0 and args.profile_seconds >= 1, "--timeout > 0 and --profile-seconds >= 1"),
            (args.probe_status_ms == 0 or args.probe_status_ms >= 10, "--probe-status-ms must be 0 or >= 10"),
        )
        for ok, message in checks:
            if not ok:
                parser.error(message)
        try:
            mix = traffic.parse_mix(args.mix)
        except ValueError as error:
            parser.error(f"--mix: {error}")
        prefetch = args.prefetch or min(65535, 2 * args.max_in_flight)
        # The provider timeout must sit well above the injected latency, or plain
        # pm_ok attempts would time out into unknown and measure reconciliation.
        timeout_s = args.timeout_s or max(10.0, 10 * args.latency_ms / 1000)
        return cls(
            attempts=args.attempts,
            system=args.system,
            celery_threads=args.celery_threads,
            latency_ms=args.latency_ms,
            latency_dist=args.latency_dist,
            max_in_flight=args.max_in_flight,
            rate=args.rate,
            prefetch=prefetch,
            batch_size=args.batch_size,
            pool_size=args.pool_size,
            timeout_s=timeout_s,
            mix=mix,
            seed=args.seed,
            timeout=args.timeout,
            json=args.json,
            # Absolute: py-spy runs in the run's directory, which is deleted afterwards.
            profile=str(Path(args.profile).resolve()) if args.profile else None,
            profile_seconds=args.profile_seconds,
            keep_running=args.keep_running,
            rev=args.rev,
            keep_logs=args.keep_logs,
            quiet=args.quiet,
            probe_status_ms=args.probe_status_ms,
            batch_delay_ms=args.batch_delay_ms,
        )

    def params(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "attempts": self.attempts,
            "latency_ms": self.latency_ms,
            "latency_dist": self.latency_dist,
            "max_in_flight": self.max_in_flight,
            "rate": self.rate,
            "prefetch": self.prefetch,
            "batch_size": self.batch_size,
            "pool_size": self.pool_size,
            "batch_delay_ms": self.batch_delay_ms,
            "timeout_s": self.timeout_s,
            "mix": self.mix,
            "seed": self.seed,
            "profiled": self.profile is not None,
        }


# --- the run -------------------------------------------------------------------------------


@dataclass
class Services:
    """The children of one run; ``stop_all`` is safe to call on any exit path."""

    workdir: Path
    code: services.PaydCode
    sandbox: ManagedProcess | None = None
    sandbox_url: str = ""
    daemon: ManagedProcess | None = None
    control_url: str = ""
    profiler: ManagedProcess | None = None

    def stop_all(self) -> None:
        for process in (self.profiler, self.daemon, self.sandbox):
            if process is not None:
                process.kill()


@dataclass
class Window:
    """What the measured window (first publish -> last terminal event) produced."""

    cpu_start: dict[str, float]
    cpu_end: dict[str, float]
    ended: str
    publish: traffic.PublishStats | None
    timeline: list[list[float]]
    daemon_peak_fds: int
    control_max_ms: float
    probe: StatusProbe | None = None


async def prepare(opts: Options, run: Services) -> None:
    """Sandbox up, config written, schema migrated, tables and queues empty, daemon ready."""
    services.raise_fd_limit(opts.max_in_flight + 1024)
    run.sandbox, sandbox_port = await services.start_sandbox(
        run.code,
        run.workdir,
        latency_ms=opts.latency_ms,
        latency_dist=opts.latency_dist,
        hang_s=opts.timeout_s + 5,  # pm_timeout answers only after payd gave up
        seed=opts.seed,
    )
    run.sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    control_port = services.free_port()
    run.control_url = f"http://127.0.0.1:{control_port}"
    config_path = run.workdir / "config.toml"
    settings = services.DaemonSettings(
        control_port=control_port,
        sandbox_port=sandbox_port,
        max_in_flight=opts.max_in_flight,
        timeout_s=opts.timeout_s,
        prefetch=opts.prefetch,
        batch_size=opts.batch_size,
        pool_size=opts.pool_size,
        batch_delay_ms=opts.batch_delay_ms,
        drain_timeout_s=opts.drain_timeout_s,
    )
    await asyncio.to_thread(services.write_config, run.code, config_path, settings)
    await asyncio.to_thread(services.run_migrate, run.code, config_path)
    await asyncio.to_thread(services.truncate_tables)
    purged = {**await services.purge_queues(), **await peers.purge_peer_queues()}
    if any(purged.values()):
        say(opts, f"purged leftovers of an earlier run: {purged}")
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(f"{run.sandbox_url}/_sandbox/reset") as reply,
    ):
        reply.raise_for_status()
    if opts.system != "payd":
        run.control_url = ""  # a peer has no control endpoint
        run.daemon, ready = peers.start_peer(
            opts.system,
            run.workdir,
            peers.PeerSettings(
                sandbox_url=run.sandbox_url,
                prefetch=opts.prefetch,
                pool_size=opts.pool_size,
                batch_size=opts.batch_size,
                batch_delay_ms=opts.batch_delay_ms,
                timeout_s=opts.timeout_s,
                drain_timeout_s=opts.drain_timeout_s,
                celery_threads=opts.celery_threads,
            ),
        )
        await peers.wait_peer_ready(run.daemon, ready)
        return
    run.daemon = services.start_daemon(run.code, run.workdir, config_path)
    await services.wait_ready(run.daemon, run.control_url)


def say(opts: Options, text: str) -> None:
    if not opts.quiet:
        print(text, file=sys.stderr, flush=True)


async def measure(
    opts: Options,
    run: Services,
    connection: aio_pika.abc.AbstractConnection,
    tracker: traffic.Tracker,
    bodies: list[bytes],
    interrupted: asyncio.Event,
) -> Window:
    """Publish everything and wait for every terminal event, printing progress each second."""
    assert run.daemon is not None
    meter = procfs.CpuMeter(
        {
            "daemon": [run.daemon.pid],
            "sandbox": [run.sandbox.pid] if run.sandbox else [],
            "harness": [os.getpid()],
            "mariadb": procfs.pids_named("mariadbd"),
            "rabbitmq": procfs.pids_named("beam.smp"),
        }
    )
    cpu_start = meter.read()
    publishing = asyncio.create_task(
        traffic.publish_requests(
            connection,
            peers.queue_of(opts.system),
            bodies,
            tracker,
            rate=opts.rate,
            window=PUBLISH_WINDOW,
            message_for=peers.message_factory(opts.system),
        )
    )
    if opts.profile:
        run.profiler = start_profiler(opts, run)
    progress = Progress(opts, run.daemon, tracker)
    probe = StatusProbe(opts, run.daemon.pid, run.control_url) if opts.probe_status_ms else None
    probing = asyncio.create_task(probe.run()) if probe else None
    try:
        ended = await watch(opts, progress, publishing, interrupted, run.control_url)
    finally:
        if probing is not None:
            probing.cancel()
            await asyncio.gather(probing, return_exceptions=True)
    cpu_end = meter.read()
    progress.peak_fds = max(progress.peak_fds, procfs.open_fds(run.daemon.pid))  # runs shorter than a tick
    publish_stats = None
    if publishing.done() and not publishing.cancelled() and publishing.exception() is None:
        publish_stats = publishing.result()
    elif not publishing.done():
        publishing.cancel()
    return Window(
        cpu_start,
        cpu_end,
        ended,
        publish_stats,
        progress.timeline,
        progress.peak_fds,
        progress.control_max_ms,
        probe,
    )


class StatusProbe:
    """``--probe-status-ms``: GET /status again and again, timing each answer, with the daemon's
    VmRSS and its provider calls in flight at that moment (the 10,000-in-flight measurement)."""

    def __init__(self, opts: Options, pid: int, control_url: str) -> None:
        self.interval_s = opts.probe_status_ms / 1000
        self.limit = opts.max_in_flight
        self.pid = pid
        self.control_url = control_url
        self.started = time.monotonic()
        self.samples: list[list[float]] = []
        """[t_s, /status ms, provider calls in flight (-1: no answer), VmRSS MiB]"""
        self.breaker_trips = 0

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while True:
                asked = time.monotonic()
                status = await daemon_status(session, self.control_url)
                answered = time.monotonic()
                lane = status.get("providers", {}).get("sandbox", {})
                rss_kib = procfs.status_kib(self.pid, "VmRSS") or 0
                self.breaker_trips = max(self.breaker_trips, int(lane.get("breaker_trips", 0)))
                self.samples.append(
                    [
                        round(asked - self.started, 3),
                        round((answered - asked) * 1000, 2) if status else math.nan,
                        int(lane.get("in_flight", -1)),
                        round(rss_kib / 1024, 1),
                    ]
                )
                await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - asked)))

    def summary(self) -> dict[str, Any]:
        """Over the samples whose answer showed the provider at its limit: /status p50/p99/max
        (unanswered ones count as failures, not as times) and the daemon's VmRSS."""
        full = [s for s in self.samples if s[2] >= self.limit]
        answered = sorted(s[1] for s in full if not math.isnan(s[1]))
        return {
            "interval_ms": round(self.interval_s * 1000, 1),
            "samples": len(self.samples),
            "at_limit": {
                "samples": len(full),
                "unanswered": len(full) - len(answered),
                "seconds": round(full[-1][0] - full[0][0], 2) if full else 0.0,
                "status_ms": latency_summary([ms / 1000 for ms in answered]),
                "rss_mib_max": max((s[3] for s in full), default=math.nan),
                "rss_mib_first": full[0][3] if full else math.nan,
            },
            "status_ms_all": latency_summary([s[1] / 1000 for s in self.samples if not math.isnan(s[1])]),
            "unanswered_all": sum(1 for s in self.samples if math.isnan(s[1])),
            "rss_mib_max_all": max((s[3] for s in self.samples), default=math.nan),
            "peak_in_flight": max((int(s[2]) for s in self.samples), default=-1),
            "breaker_trips": self.breaker_trips,
            "timeline": self.samples,
        }


class Progress:
    """One sample a second: the progress line on stderr, the timeline, the fd peak."""

    def __init__(self, opts: Options, daemon: ManagedProcess, tracker: traffic.Tracker) -> None:
        self.opts = opts
        self.daemon = daemon
        self.tracker = tracker
        self.started = time.monotonic()
        self.timeline: list[list[float]] = []
        self.peak_fds = 0
        self.control_max_ms = 0.0
        self._last = (self.started, 0, 0, procfs.cpu_seconds(daemon.pid) or 0.0)

    def seconds_without_events(self) -> float:
        """Since the last terminal event (or the start): how long nothing has finished."""
        last = self.tracker.last_terminal
        return time.monotonic() - (self.started if math.isnan(last) else last)

    def sample(self, status: dict[str, Any], *, control_ms: float) -> None:
        now, tracker = time.monotonic(), self.tracker
        last_time, last_published, last_finished, last_cpu = self._last
        elapsed = max(now - last_time, 1e-6)
        cpu = procfs.cpu_seconds(self.daemon.pid) or last_cpu
        cores = (cpu - last_cpu) / elapsed
        # Every provider call in flight is a socket: the fd count shows how close
        # the daemon runs to its open-file limit.
        self.peak_fds = max(self.peak_fds, procfs.open_fds(self.daemon.pid))
        # /status answers from the daemon's event loop: its delay is the loop's lag.
        self.control_max_ms = max(self.control_max_ms, control_ms)
        lane = status.get("providers", {}).get("sandbox", {})
        recorded = status.get("counters", {}).get("finished", -1)
        in_flight = lane.get("in_flight", -1)
        self.timeline.append(
            [
                round(now - self.started, 2),
                tracker.published,
                tracker.finished,
                recorded,
                in_flight,
                round(cores, 3),
                round(control_ms, 1),
            ]
        )
        say(
            self.opts,
            f"[{now - self.started:6.1f}s] published {tracker.published:,}/{tracker.count:,} "
            f"({(tracker.published - last_published) / elapsed:,.0f}/s)  recorded {recorded:,}  "
            f"events {tracker.finished:,} ({(tracker.finished - last_finished) / elapsed:,.0f}/s)  "
            f"unknown {tracker.unknown_first:,}  "
            f"in_flight {in_flight:,} waiting {lane.get('waiting', -1):,}  "
            f"daemon cpu {cores * 100:.0f}%",
        )
        self._last = (now, tracker.published, tracker.finished, cpu)


async def watch(
    opts: Options,
    progress: Progress,
    publishing: asyncio.Task[traffic.PublishStats],
    interrupted: asyncio.Event,
    control_url: str,
) -> str:
    """Tick once a second until every terminal event is in; return why the window ended."""
    daemon, tracker = progress.daemon, progress.tracker
    # Longer than any attempt can legitimately take: a provider timeout, then reconciliation.
    stall_s = max(60.0, 3 * opts.timeout_s)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            try:
                await asyncio.wait_for(tracker.all_finished.wait(), timeout=1.0)
                return "finished"
            except TimeoutError:
                pass
            if interrupted.is_set():
                return "interrupted"
            if not daemon.running():
                return f"daemon exited with {daemon.popen.returncode}"
            if publishing.done() and publishing.exception() is not None:
                return f"publishing failed: {publishing.exception()!r}"
            if time.monotonic() - progress.started > opts.timeout:
                return f"timed out after {opts.timeout:.0f} s"
            if progress.seconds_without_events() > stall_s:
                # Nothing moves: something else drained the outbox, or the daemon is stuck.
                return f"no terminal event for {stall_s:.0f} s"
            asked = time.monotonic()
            status = await daemon_status(session, control_url)
            progress.sample(status, control_ms=(time.monotonic() - asked) * 1000)


async def daemon_status(session: aiohttp.ClientSession, control_url: str) -> dict[str, Any]:
    """The daemon's /status, or {} when it does not answer in time (a busy loop is data too)."""
    if not control_url:
        return {}  # a peer: nothing to ask
    try:
        status: dict[str, Any] = await services.get_json(session, f"{control_url}/status")
    except (aiohttp.ClientError, OSError, TimeoutError):
        return {}
    return status


def start_profiler(opts: Options, run: Services) -> ManagedProcess:
    """py-spy, non-blocking so it does not pause the daemon it measures."""
    assert run.daemon is not None and opts.profile is not None
    suffix = Path(opts.profile).suffix
    fmt = {".txt": "raw", ".json": "speedscope"}.get(suffix, "flamegraph")
    py_spy = shutil.which("py-spy") or str(services.REPO / ".venv" / "bin" / "py-spy")
    argv = [
        py_spy,
        "record",
        "--nonblocking",
        "--pid",
        str(run.daemon.pid),
        "--duration",
        str(int(opts.profile_seconds)),
        "--format",
        fmt,
        "--output",
        opts.profile,
    ]
    say(opts, f"profiling the daemon for {opts.profile_seconds:.0f} s into {opts.profile}")
    return ManagedProcess("py-spy", argv, run.workdir / "py-spy.log")


@dataclass
class Aftermath:
    """What is read after the window: peaks from the live processes, then the drain and the checks."""

    status: dict[str, Any]
    sandbox_stats: dict[str, Any]
    rss_mib: float
    shutdown: Shutdown
    ledger: LedgerCheck
    database: dict[str, int]
    commit_times: dict[str, float]
    metrics_text: str = ""


async def finish(opts: Options, run: Services, tracker: traffic.Tracker) -> Aftermath:
    """Peaks while the daemon lives; SIGTERM and time the drain; then ledger and database checks."""
    assert run.daemon is not None and run.sandbox is not None
    if run.profiler is not None:
        # Let py-spy finish its recording and write the file; it is bounded by --duration.
        await run.profiler.wait(opts.profile_seconds + 30)
        run.profiler.kill()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        status = await daemon_status(session, run.control_url)
        metrics_text = await daemon_metrics(session, run.control_url)
        sandbox_stats: dict[str, Any] = await services.get_json(session, f"{run.sandbox_url}/_sandbox/stats")
        rss_kib = procfs.status_kib(run.daemon.pid, "VmHWM") or 0
        exit_code, drain_s = await run.daemon.stop(opts.drain_timeout_s + 15)
        # The ledger is read after the drain, so charges made during it count too.
        ledger = await services.get_json(session, f"{run.sandbox_url}/_sandbox/ledger")
    await run.sandbox.stop(10)
    return Aftermath(
        status=status,
        sandbox_stats=sandbox_stats,
        rss_mib=rss_kib / 1024,
        shutdown=Shutdown(exit_code=exit_code, drain_s=round(drain_s, 3)),
        ledger=check_ledger(ledger["charges"], tracker.key_prefix),
        database=await asyncio.to_thread(services.attempt_states, tracker.key_prefix),
        commit_times=await asyncio.to_thread(services.commit_times, tracker.key_prefix),
        metrics_text=metrics_text,
    )


async def daemon_metrics(session: aiohttp.ClientSession, control_url: str) -> str:
    """The daemon's /metrics text ('' for a peer, or when it does not answer)."""
    if not control_url:
        return ""
    try:
        async with session.get(f"{control_url}/metrics") as response:
            response.raise_for_status()
            return await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return ""


async def wait_for_ctrl_c(opts: Options, run: Services, interrupted: asyncio.Event) -> None:
    assert run.daemon is not None and run.sandbox is not None
    print(
        f"--keep-running: daemon pid {run.daemon.pid} ({run.control_url}/status), "
        f"sandbox pid {run.sandbox.pid} ({run.sandbox_url}/_sandbox/stats), "
        f"logs in {run.workdir}. Ctrl-C to drain, check and report.",
        file=sys.stderr,
        flush=True,
    )
    interrupted.clear()
    await interrupted.wait()


def machine_facts(connection: aio_pika.abc.AbstractConnection, fd_limit: int) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    server = getattr(connection.transport, "connection", None) if hasattr(connection, "transport") else None
    properties = getattr(server, "server_properties", {}) or {}
    version = properties.get("version", b"?")
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_total_mib": int(meminfo[1]) // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rabbitmq": version.decode() if isinstance(version, bytes) else str(version),
        "mariadb": services.mysql_version(),
        "open_files_limit": fd_limit,
    }


async def run_benchmark(opts: Options, interrupted: asyncio.Event) -> Result:
    """One run: under the database lock, in a directory of its own, kept when the run failed."""
    lock = services.DatabaseLock()
    await asyncio.to_thread(lock.acquire)
    workdir = Path(tempfile.mkdtemp(prefix="payd-bench-"))
    keep_workdir = True
    try:
        result = await run_in(opts, workdir, interrupted)
        keep_workdir = opts.keep_logs or not result.ok
        return result
    finally:
        lock.release()
        if keep_workdir:
            # Logs and config of a failed run are the first thing to read.
            print(f"bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def run_in(opts: Options, workdir: Path, interrupted: asyncio.Event) -> Result:
    """Prepare, measure, drain and check; every child process is stopped on the way out."""
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    bodies, tokens = traffic.build_requests(run_id, opts.attempts, opts.mix, opts.seed)
    tracker = traffic.Tracker(run_id=run_id, count=opts.attempts)
    code = services.snapshot(opts.rev, workdir / "src") if opts.rev else services.working_tree()
    run = Services(workdir=workdir, code=code)
    try:
        say(opts, f"run {run_id}: payd from {code.facts}; preparing (logs in {workdir})")
        await prepare(opts, run)
        assert run.daemon is not None
        say(opts, f"daemon pid {run.daemon.pid} ready; publishing {opts.attempts:,} requests")
        connection = await aio_pika.connect(
            services.amqp_url(), client_properties={"connection_name": "payd-bench"}
        )
        try:
            machine = machine_facts(connection, services.open_files_limit())
            await traffic.consume_events(connection, f"{services.NAMESPACE}.events", tracker)
            window = await measure(opts, run, connection, tracker, bodies, interrupted)
            if opts.keep_running and window.ended == "finished":
                await wait_for_ctrl_c(opts, run, interrupted)
        finally:
            await connection.close()
        after = await finish(opts, run, tracker)
        return assemble(opts, run_id, started_at, machine, code, tracker, tokens, window, after)
    finally:
        run.stop_all()


def assemble(
    opts: Options,
    run_id: str,
    started_at: str,
    machine: dict[str, Any],
    code: services.PaydCode,
    tracker: traffic.Tracker,
    tokens: list[str],
    window: Window,
    after: Aftermath,
) -> Result:
    """Turn the raw readings into the result, and list what went wrong."""
    end = tracker.last_terminal if window.ended == "finished" else time.monotonic()
    window_s = end - tracker.first_publish
    cpu = procfs.cpu_deltas(window.cpu_start, window.cpu_end)
    done = max(tracker.finished, 1)
    groups = [name for name in cpu if not name.startswith("machine_")]
    first_publish_wall = tracker.first_publish + tracker.wall_offset
    last_commit = max(after.commit_times.values(), default=math.nan)
    lane = after.status.get("providers", {}).get("sandbox", {})
    return Result(
        run_id=run_id,
        started_at=started_at,
        ok=not (problems := find_problems(opts, tracker, window, after)),
        problems=problems,
        params=opts.params(),
        code=code.facts,
        machine=machine,
        attempts=opts.attempts,
        published=tracker.published,
        completed=tracker.finished,
        outcomes=dict(tracker.events),
        tokens={token: tokens.count(token) for token in sorted(set(tokens))},
        unknown_first=tracker.unknown_first,
        repeated_terminal_events=tracker.repeated_terminal,
        window_s=round(window_s, 3),
        attempts_per_s=round(tracker.finished / window_s, 1),
        steady_attempts_per_s=round(steady_rate(tracker.finished_at), 1),
        committed_per_s=round(len(after.commit_times) / (last_commit - first_publish_wall), 1),
        steady_committed_per_s=round(steady_rate(list(after.commit_times.values())), 1),
        cpu_us_per_attempt={name: round(cpu[name] * 1e6 / done, 1) for name in groups},
        cpu_cores_busy={
            **{name: round(cpu[name] / window_s, 3) for name in groups},
            # Anything else on the machine (other users' tests, system daemons).
            # (clamped: over very short windows the 10 ms clock ticks can make it dip below 0)
            "other": round(max(0.0, cpu["machine_busy"] - sum(cpu[name] for name in groups)) / window_s, 3),
            "machine": round(cpu["machine_busy"] / window_s, 3),
        },
        latency_ms=latency_summary(tracker.latencies_s()),
        commit_latency_ms=latency_summary(tracker.commit_latencies_s(after.commit_times)),
        outbox_lag_ms=latency_summary(tracker.outbox_lags_s(after.commit_times)),
        daemon_outbox_lag=daemon_outbox_lag(after.metrics_text),
        status_probe=window.probe.summary() if window.probe else None,
        publish_s=round(window.publish.seconds, 3) if window.publish else math.nan,
        publish_max_lag_ms=round(window.publish.max_lag_s * 1000, 2) if window.publish else math.nan,
        peak_in_flight={
            "sandbox": int(after.sandbox_stats.get("peak_in_flight", -1)),
            "daemon": int(lane.get("peak_in_flight", -1)),
            "limit": opts.max_in_flight,
        },
        daemon_peak_rss_mib=round(after.rss_mib, 1),
        daemon_peak_fds=window.daemon_peak_fds,
        control_max_ms=round(window.control_max_ms, 1),
        shutdown=after.shutdown,
        ledger=after.ledger,
        database=after.database,
        timeline=window.timeline,
    )


def find_problems(opts: Options, tracker: traffic.Tracker, window: Window, after: Aftermath) -> list[str]:
    problems: list[str] = []
    if window.ended != "finished":
        problems.append(window.ended)
    if tracker.finished < opts.attempts:
        problems.append(f"{opts.attempts - tracker.finished} attempts never reached a terminal event")
    if after.shutdown.exit_code != 0:
        problems.append(f"daemon exit code {after.shutdown.exit_code} after SIGTERM (expected 0)")
    if not after.ledger.ok:
        problems.append("DOUBLE CHARGE in the sandbox ledger")
    if after.database.get("rows_not_from_this_run"):
        problems.append(
            f"{after.database['rows_not_from_this_run']} attempts rows of something else in payd_bench: "
            "another program used the database during the run"
        )
    if tracker.foreign or after.ledger.foreign_charges:
        problems.append(
            f"{tracker.foreign} events and {after.ledger.foreign_charges} charges from other runs"
        )
    return problems


# --- entry point ---------------------------------------------------------------------------


def write_json(result: Result, path: str | None) -> None:
    """Pretty JSON into ``path``, or one compact line on stdout."""
    encoded = msgspec.json.encode(result)
    if path is None:
        print(encoded.decode())
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(msgspec.json.format(encoded, indent=2) + b"\n")
    print(f"JSON written to {path}", file=sys.stderr)


async def main_async(opts: Options) -> Result:
    """Run the benchmark with signals wired up; BenchError and CancelledError propagate."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_signal() -> None:
        # The first Ctrl-C/SIGTERM ends the measurement (or --keep-running's wait) and
        # goes on to drain and report; a second one abandons the run (children killed).
        if interrupted.is_set():
            main_task.cancel()
        interrupted.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    return await run_benchmark(opts, interrupted)


def report(opts: Options, result: Result) -> int:
    """Print the table (and the profile summary), write the JSON, pick the exit status."""
    print(render_text(result))
    if opts.profile and opts.profile.endswith(".txt") and Path(opts.profile).is_file():
        print(stacks.summarise(Path(opts.profile)), file=sys.stderr)
    write_json(result, opts.json)
    if not result.ledger.ok:
        return EXIT_DOUBLE_CHARGE
    return EXIT_OK if result.ok else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = Options.from_args(parser.parse_args(argv), parser)
    os.environ.setdefault("CREDENTIALS_DIRECTORY", str(services.REPO / ".secrets"))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            result = runner.run(main_async(opts))
        except BenchError as error:
            print(f"bench: {error}", file=sys.stderr)
            return EXIT_SETUP
        except asyncio.CancelledError:
            print("bench: abandoned; every child process was stopped", file=sys.stderr)
            return EXIT_FAILED
    return report(opts, result)


if __name__ == "__main__":
    sys.exit(main())
