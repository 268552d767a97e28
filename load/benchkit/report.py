"""The benchmark's result: one typed record, rendered as a text table and as JSON."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import msgspec
from prometheus_client.parser import text_string_to_metric_families


class Latency(msgspec.Struct, kw_only=True):
    """End-to-end milliseconds: request published -> its terminal payment.* event consumed."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


class LedgerCheck(msgspec.Struct, kw_only=True):
    """Invariant 1 as the gateway saw it: no key and no merchant reference approved twice."""

    charges: int
    approved: int
    declined: int
    keys_approved_twice: list[str]
    references_approved_twice: list[str]
    foreign_charges: int
    """Charges whose key is not this run's (should be 0: the sandbox is fresh)."""

    @property
    def ok(self) -> bool:
        return not self.keys_approved_twice and not self.references_approved_twice


class DaemonOutboxLag(msgspec.Struct, kw_only=True):
    """The daemon's own ``payd_outbox_event_lag_seconds`` histogram at the end of the window:
    per outbox row, written -> confirmed by the broker (docs/observability.md)."""

    events: int
    mean_ms: float
    share_within_1s: float
    """Fraction of rows confirmed within 1 s of being written: >= 0.99 means p99 < 1 s."""


def daemon_outbox_lag(metrics_text: str) -> DaemonOutboxLag | None:
    """Read the histogram out of a /metrics scrape (None: the daemon does not export it)."""
    count = total = within = math.nan
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "payd_outbox_event_lag_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 1.0:
                within = sample.value
    if math.isnan(count):
        return None
    return DaemonOutboxLag(
        events=int(count),
        mean_ms=round(total / count * 1000, 2) if count else math.nan,
        share_within_1s=round(within / count, 5) if count else math.nan,
    )


class Shutdown(msgspec.Struct, kw_only=True):
    exit_code: int | None
    """None: it did not exit within the drain timeout and was killed."""
    drain_s: float


class Result(msgspec.Struct, kw_only=True):
    run_id: str
    started_at: str
    ok: bool
    problems: list[str]
    params: dict[str, Any]
    code: dict[str, Any]
    """Which payd ran: the working tree (commit + whether daemon/ had edits) or a --rev snapshot."""
    machine: dict[str, Any]
    attempts: int
    published: int
    completed: int
    outcomes: dict[str, int]
    tokens: dict[str, int]
    unknown_first: int
    repeated_terminal_events: int
    window_s: float
    attempts_per_s: float
    steady_attempts_per_s: float
    """Completions between the 10th and 90th percentile of completion time, per second:
    the plateau without the ramp-up and the tail."""
    committed_per_s: float
    """Outcomes committed in MySQL per second, first publish -> last ``finished_at``: the
    daemon's own pace, before the outbox relay turns outcomes into events."""
    steady_committed_per_s: float
    """Commits between the 10th and 90th percentile commit time, per second: the daemon's
    plateau, without the publisher's ramp-up and the tail."""
    cpu_us_per_attempt: dict[str, float]
    cpu_cores_busy: dict[str, float]
    """Average cores in use over the window (1.0 = one core flat out), per process group."""
    latency_ms: Latency | None
    commit_latency_ms: Latency | None
    """Published -> outcome committed (``attempts.finished_at``); the gap to ``latency_ms``
    is the outbox relay's."""
    outbox_lag_ms: Latency | None = None
    """Per attempt: outcome committed (``attempts.finished_at``) -> its terminal event
    consumed from ``payd.events`` by the harness: what the outbox relay adds."""
    daemon_outbox_lag: DaemonOutboxLag | None = None
    status_probe: dict[str, Any] | None = None
    """``--probe-status-ms``: /status answer times and the daemon's VmRSS sampled through the
    window, summarised over the samples with the provider at its max_in_flight."""
    publish_s: float
    publish_max_lag_ms: float
    peak_in_flight: dict[str, int]
    daemon_peak_rss_mib: float
    daemon_peak_fds: int
    control_max_ms: float
    """Slowest answer of the daemon's GET /status during the window (sampled once a second):
    how long its event loop kept a control request waiting."""
    shutdown: Shutdown
    ledger: LedgerCheck
    database: dict[str, int]
    timeline: list[list[float]]
    """One row a second: [t_s, published, completed (events seen), recorded (daemon's
    finished counter), daemon provider calls in flight, daemon CPU cores, /status ms]."""


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latency_summary(latencies_s: list[float]) -> Latency | None:
    if not latencies_s:
        return None
    ordered = sorted(latencies_s)
    ms = [value * 1000 for value in ordered]
    return Latency(
        count=len(ms),
        mean=round(sum(ms) / len(ms), 2),
        p50=round(percentile(ms, 0.50), 2),
        p90=round(percentile(ms, 0.90), 2),
        p99=round(percentile(ms, 0.99), 2),
        max=round(ms[-1], 2),
    )


def steady_rate(finished_at: list[float]) -> float:
    """Completions per second between the 10th and 90th percentile completion times."""
    times = sorted(t for t in finished_at if not math.isnan(t))
    if len(times) < 10:
        return math.nan
    low, high = int(len(times) * 0.1), int(len(times) * 0.9)
    span = times[high] - times[low]
    return (high - low) / span if span > 0 else math.nan


def check_ledger(charges: list[dict[str, Any]], run_prefix: str) -> LedgerCheck:
    approved = [c for c in charges if c.get("status") == "approved"]
    by_key = Counter(c["idempotency_key"] for c in approved)
    by_reference = Counter(c["merchant_reference"] for c in approved)
    return LedgerCheck(
        charges=len(charges),
        approved=len(approved),
        declined=len(charges) - len(approved),
        keys_approved_twice=sorted(k for k, n in by_key.items() if n > 1)[:20],
        references_approved_twice=sorted(r for r, n in by_reference.items() if n > 1)[:20],
        foreign_charges=sum(1 for c in charges if not c["idempotency_key"].startswith(run_prefix)),
    )


# --- text ----------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def render_text(result: Result) -> str:
    p = result.params
    rate = f"{p['rate']:g}/s" if p["rate"] else "max"
    rows: list[tuple[str, str]] = [
        ("run", f"{result.run_id}  ({result.started_at})"),
        (
            "payd",
            f"{result.code.get('source')} {str(result.code.get('commit', ''))[:10]}"
            + (" + uncommitted daemon/ edits" if result.code.get("daemon_dirty") else ""),
        ),
        ("system", str(p.get("system", "payd"))),
        (
            "load",
            f"{p['attempts']:,} attempts, latency {p['latency_ms']:g} ms {p['latency_dist']}, "
            f"rate {rate}, max_in_flight {p['max_in_flight']:,}, "
            f"prefetch {p['prefetch']:,}, batch {p['batch_size']}",
        ),
        ("completed", f"{result.completed:,} / {result.attempts:,} in {_fmt(result.window_s, 2)} s"),
        (
            "attempts/s",
            f"{_fmt(result.attempts_per_s, 1)} end to end (events); "
            f"{_fmt(result.committed_per_s, 1)} committed in MySQL, "
            f"{_fmt(result.steady_committed_per_s, 1)} at the 10-90% plateau",
        ),
    ]
    cpu = result.cpu_us_per_attempt
    rows.append(("daemon CPU/attempt", f"{_fmt(cpu.get('daemon', math.nan))} us"))
    rows.append(
        (
            "CPU/attempt, others",
            "  ".join(f"{name} {_fmt(value)} us" for name, value in cpu.items() if name != "daemon"),
        )
    )
    rows.append(
        (
            "cores busy (avg)",
            "  ".join(f"{name} {value:.2f}" for name, value in result.cpu_cores_busy.items()),
        )
    )
    latencies = (
        ("latency ms, event", result.latency_ms),
        ("latency ms, commit", result.commit_latency_ms),
        ("outbox lag ms", result.outbox_lag_ms),
    )
    for label, lat in latencies:
        if lat is not None:
            rows.append(
                (
                    label,
                    f"p50 {_fmt(lat.p50, 1)}  p90 {_fmt(lat.p90, 1)}  p99 {_fmt(lat.p99, 1)}  "
                    f"max {_fmt(lat.max, 1)}  mean {_fmt(lat.mean, 1)}",
                )
            )
    if result.daemon_outbox_lag is not None:
        lag = result.daemon_outbox_lag
        rows.append(
            (
                "outbox lag, daemon",
                f"{lag.events:,} events, mean {_fmt(lag.mean_ms, 1)} ms, "
                f"{_fmt(lag.share_within_1s * 100, 2)}% within 1 s (payd_outbox_event_lag_seconds)",
            )
        )
    probe = result.status_probe
    if probe is not None:
        full = probe["at_limit"]
        lat = full["status_ms"]
        timing = (
            f"p50 {_fmt(lat.p50, 1)}  p99 {_fmt(lat.p99, 1)}  max {_fmt(lat.max, 1)} ms"
            if lat is not None
            else "no answers"
        )
        rows.append(
            (
                "at max_in_flight",
                f"{full['samples']:,} /status probes over {_fmt(full['seconds'], 1)} s: {timing}, "
                f"{full['unanswered']} unanswered; daemon VmRSS max {_fmt(full['rss_mib_max'], 1)} MiB",
            )
        )
        everything = probe["status_ms_all"]
        rows.append(
            (
                "whole window",
                f"{probe['samples']:,} /status probes: "
                + (
                    f"p50 {_fmt(everything.p50, 1)}  p99 {_fmt(everything.p99, 1)}  "
                    f"max {_fmt(everything.max, 1)} ms"
                    if everything is not None
                    else "no answers"
                )
                + f", {probe['unanswered_all']} unanswered; peak in flight {probe['peak_in_flight']:,}, "
                f"VmRSS max {_fmt(probe['rss_mib_max_all'], 1)} MiB, breaker trips {probe['breaker_trips']}",
            )
        )
    rows += [
        (
            "publishing",
            f"{_fmt(result.publish_s, 2)} s, "
            f"worst lag behind schedule {_fmt(result.publish_max_lag_ms, 1)} ms",
        ),
        (
            "peak in flight",
            "  ".join(f"{name} {value:,}" for name, value in result.peak_in_flight.items()),
        ),
        (
            "daemon peaks",
            f"RSS {_fmt(result.daemon_peak_rss_mib, 1)} MiB (VmHWM), {result.daemon_peak_fds:,} open fds, "
            f"slowest /status {_fmt(result.control_max_ms, 0)} ms",
        ),
        ("outcomes", "  ".join(f"{k} {v:,}" for k, v in sorted(result.outcomes.items())) or "none"),
        (
            "unknown / repeats",
            f"{result.unknown_first:,} attempts went through payment.unknown; "
            f"{result.repeated_terminal_events:,} repeated terminal events",
        ),
        (
            "shutdown",
            f"exit {result.shutdown.exit_code if result.shutdown.exit_code is not None else 'KILLED'} "
            f"after {_fmt(result.shutdown.drain_s, 2)} s of drain",
        ),
        ("database", "  ".join(f"{k} {v:,}" for k, v in sorted(result.database.items()))),
    ]
    ledger = result.ledger
    verdict = (
        "OK: no idempotency key and no merchant reference approved twice"
        if ledger.ok
        else (
            f"DOUBLE CHARGE: {len(ledger.keys_approved_twice)} keys and "
            f"{len(ledger.references_approved_twice)} merchant references approved twice"
        )
    )
    rows.append(
        (
            "sandbox ledger",
            f"{ledger.charges:,} charges ({ledger.approved:,} approved, "
            f"{ledger.declined:,} declined); {verdict}",
        )
    )
    width = max(len(label) for label, _ in rows)
    lines = [f"{label.ljust(width)}  {value}" for label, value in rows]
    if not ledger.ok:
        banner = "!" * 78
        lines += [
            banner,
            "!!! DOUBLE CHARGE DETECTED: invariant 1 is broken.",
            f"!!! keys: {', '.join(ledger.keys_approved_twice[:5])}",
            f"!!! references: {', '.join(ledger.references_approved_twice[:5])}",
            banner,
        ]
    lines.append("result: OK" if result.ok else "result: FAILED - " + "; ".join(result.problems))
    return "\n".join(lines)
