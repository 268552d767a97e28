"""Prometheus metrics, one registry per daemon (tests run several daemons in one process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from daemon.logs import LogShippingCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.attempts = Counter(
            "payd_attempts",
            "Attempts finished, by provider and outcome",
            ["provider", "outcome"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "payd_attempt_seconds",
            "Claim to recorded outcome, by provider",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.provider_call_seconds = Histogram(
            "payd_provider_call_seconds",
            "One provider call",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.provider_wait_seconds = Histogram(
            "payd_provider_wait_seconds",
            "From claim to the first provider call starting (halt, pause, breaker, rate limit, limiter)",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.declines = Counter(
            "payd_declines",
            "Declines by the provider's code (from the adapter's table)",
            ["provider", "decline_code"],
            registry=r,
        )
        self.in_flight = Gauge(
            "payd_provider_in_flight", "Provider calls in flight", ["provider"], registry=r
        )
        self.rate_limited = Counter(
            "payd_provider_rate_limited",
            "429 answers; each pauses the provider's lane",
            ["provider"],
            registry=r,
        )
        self.failovers = Counter(
            "payd_provider_failovers",
            "Attempts sent to a failover connection because the first was never reached",
            ["provider", "to"],
            registry=r,
        )
        self.messages = Counter(
            "payd_messages", "Broker deliveries by what became of them", ["result"], registry=r
        )
        self.dead_lettered = Counter(
            "payd_dead_lettered", "Invalid requests moved to the dead-letter queue", registry=r
        )
        self.stale_settles = Counter(
            "payd_stale_settles",
            "Acks/requeues dropped because their channel had closed",
            registry=r,
        )
        self.batch_size = Histogram(
            "payd_batch_size",
            "Rows per database batch",
            ["stage"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "payd_batch_seconds",
            "Database batch duration",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_errors = Counter("payd_batch_errors", "Failed database batches", ["stage"], registry=r)
        self.outbox_published = Counter("payd_outbox_published", "Outbox rows published", registry=r)
        self.outbox_lag = Gauge("payd_outbox_lag_seconds", "Age of the oldest unpublished event", registry=r)
        self.outbox_event_lag = Histogram(
            "payd_outbox_event_lag_seconds",
            "Per published outbox row: written (in its change's commit) to confirmed by the broker",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reconciled = Counter(
            "payd_reconciled",
            "Unknown attempts looked up, by what the lookup found",
            ["result"],
            registry=r,
        )
        self.leases_expired = Counter(
            "payd_leases_expired",
            "In-flight attempts turned unknown after their claimer stopped",
            registry=r,
        )
        self.refunds = Counter(
            "payd_refunds",
            "Refunds finished or refused, by provider and state (refused: the decline code)",
            ["provider", "state"],
            registry=r,
        )
        self.refunds_pending_stale = Gauge(
            "payd_refunds_pending_stale",
            "Refunds the provider accepted but has not decided for longer than pending_reversal_alert_s",
            registry=r,
        )
        self.webhook_notifications = Counter(
            "payd_webhook_notifications",
            "Reversal notifications received, by provider and what came of each (settled, duplicate, "
            "unmatched, mismatch, conflict, ignored, bad_signature, malformed, ...)",
            ["provider", "result"],
            registry=r,
        )
        self.orphans_failed = Counter(
            "payd_orphans_failed",
            "Queued attempts nobody claimed within queued_orphan_after_s, failed as never_sent",
            registry=r,
        )
        self.parked = Gauge(
            "payd_attempts_parked",
            "Unknown attempts parked after a lookup raised: no automatic lookups until an operator acts",
            registry=r,
        )
        self.refunds_parked = Gauge(
            "payd_refunds_parked",
            "Unknown refunds parked (a lookup raised, or nothing the provider says can settle them): "
            "no automatic lookups until an operator acts",
            registry=r,
        )
        self.duty_up = Gauge(
            "payd_duty_up",
            "1 while the background duty runs; 0 crashed, restarting or stopped",
            ["duty"],
            registry=r,
        )
        self.duty_crashes = Counter(
            "payd_duty_crashes",
            "Background duty crashes (each logged with its traceback and restarted)",
            ["duty"],
            registry=r,
        )
        self.duty_failing = Gauge(
            "payd_duty_failing",
            "1 while the duty keeps crashing: /readyz is red (critical duties: the watchdog stops)",
            ["duty"],
            registry=r,
        )
        self.unknown_attempts = Gauge(
            "payd_unknown_attempts", "Attempts in state unknown (may have charged), fleet-wide", registry=r
        )
        self.unknown_oldest = Gauge(
            "payd_unknown_oldest_seconds", "Age of the oldest unknown attempt's last change", registry=r
        )
        self.queue_messages = Gauge(
            "payd_queue_messages",
            "Messages ready in payd's queues (attempts, dead letters)",
            ["queue"],
            registry=r,
        )
        self.broker_reconnects = Counter("payd_broker_reconnects", "Reconnections to RabbitMQ", registry=r)
        self.database_ok = Gauge(
            "payd_database_ok", "1 while the health probe's database round trip answers in time", registry=r
        )
        self.intake_paused = Gauge(
            "payd_intake_paused",
            "1 while intake takes no new deliveries because the database does not answer",
            registry=r,
        )
        self.slots_held = Gauge(
            "payd_provider_slots_held",
            "In-flight slots kept after a call ended unknown: the provider may still be working on it",
            ["provider"],
            registry=r,
        )
        self.claims_taken_over = Counter(
            "payd_claims_taken_over",
            "In-flight attempts of this instance's previous process made unknown at start-up",
            registry=r,
        )

        # CPU seconds, resident memory and open descriptors of this process; the Python version;
        # the cyclic garbage collector's runs (daemon/runtime.py sets it up).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(LogShippingCollector())  # payd_log_records_{sent,dropped,failed}_total, queue depth
        # The state of lanes, halt and broker is read when scraped: ``control.LiveStateCollector``.
        self._providers: dict[str, ProviderMetrics] = {}
        self._messages: dict[str, Counter] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- pre-bound children for the per-attempt hot path ----------------------------------
    # ``labels()`` validates and stringifies its values and takes a lock on every call: six
    # calls per attempt showed as ~2% of the daemon's CPU at saturation. The children are
    # bound on first use (a series appears once it has a value, as before) and kept.

    def provider(self, name: str) -> ProviderMetrics:
        """The per-attempt series of one provider connection, bound once."""
        bound = self._providers.get(name)
        if bound is None:
            bound = self._providers[name] = ProviderMetrics(self, name)
        return bound

    def message(self, result: str) -> Counter:
        """``payd_messages_total{result=...}``, bound once per result."""
        child = self._messages.get(result)
        if child is None:
            child = self._messages[result] = self.messages.labels(result)
        return child


class ProviderMetrics:
    """One provider's per-attempt series: ``labels()`` done once instead of on every attempt."""

    __slots__ = (
        "_attempts",
        "_by_outcome",
        "_provider",
        "attempt_seconds",
        "call_seconds",
        "in_flight",
        "wait_seconds",
    )

    def __init__(self, metrics: Metrics, provider: str) -> None:
        self._provider = provider
        self._attempts = metrics.attempts
        self._by_outcome: dict[str, Counter] = {}
        self.in_flight = metrics.in_flight.labels(provider)
        self.wait_seconds = metrics.provider_wait_seconds.labels(provider)
        self.call_seconds = metrics.provider_call_seconds.labels(provider)
        self.attempt_seconds = metrics.attempt_seconds.labels(provider)

    def attempts(self, outcome: str) -> Counter:
        """``payd_attempts_total{provider, outcome}``."""
        child = self._by_outcome.get(outcome)
        if child is None:
            child = self._by_outcome[outcome] = self._attempts.labels(self._provider, outcome)
        return child
