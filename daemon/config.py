"""payd's configuration: config.toml decoded in one pass into typed, frozen structs.

Unknown or mistyped keys fail with the key's dotted path and the reason. Each
provider's table is decoded by the configuration type its ``kind`` registers
(see ``daemon.providers.registry``), so a plugin provider brings its own keys.
Secrets are not configuration: see ``daemon.secrets``. The provider base table
(``ProviderConfig``) belongs to the provider API, ``daemon.providers.base``.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

# Re-exported (the alias tells mypy so): callers import both from here, as before.
from daemon.errors import ConfigError as ConfigError  # noqa: PLC0414
from daemon.providers.base import PositiveFloat
from daemon.providers.base import ProviderConfig as ProviderConfig  # noqa: PLC0414
from daemon.providers.registry import provider_config_type
from daemon.subscriptions.networks import (
    EVERY_RULE,
    MASTERCARD_DAILY_LIMIT,
    MASTERCARD_MONTHLY_LIMIT,
    VISA_LIMITS,
    NetworkRule,
    network_rules,
    schedule_problem,
)

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,62}\Z")]


class Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every configuration table: immutable, keyword-only, unknown keys rejected."""


class DaemonSettings(Section, frozen=True):
    instance_id: str = ""
    """Identifies this process in attempt claims; empty means ``HOSTNAME:PID``."""
    drain_timeout_s: PositiveFloat = 30.0
    startup_timeout_s: PositiveFloat = 30.0
    """How long start-up waits for MySQL, RabbitMQ and Redis before exiting non-zero."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    duty_restart_backoff_s: Annotated[list[PositiveFloat], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
    )
    """Wait before the n-th restart in a row of a crashed background duty; the last repeats."""
    duty_failing_after: Annotated[int, msgspec.Meta(ge=1)] = 3
    """Crashes in a row after which a duty is failing: /readyz red, the watchdog withheld if critical."""
    duty_stable_after_s: PositiveFloat = 60.0
    """A duty that runs this long without crashing has recovered: its streak starts again."""


class GelfSettings(Section, frozen=True):
    """Logs to Graylog as GELF, besides stdout; off unless ``host`` is set."""

    host: str = ""
    port: Port = 12201
    protocol: Literal["udp", "tcp", "tls"] = "udp"
    tls_ca_file: str = ""
    """CA bundle to verify the Graylog server with ``protocol = "tls"``; empty uses the system's."""
    queue_size: Annotated[int, msgspec.Meta(ge=100)] = 10000
    """Log records buffered for the sender thread; when full, records are dropped and counted."""


class TlsSettings(Section, frozen=True):
    """``[mysql.tls]``, ``[rabbitmq.tls]``, ``[redis.tls]``: how payd verifies a server and proves
    itself to it. One shape for every link, so a second node or a failover target reuses it."""

    ca_file: str = ""
    """PEM bundle of the CAs the server's certificate must chain to; empty: the system's store."""
    cert_file: str = ""
    """Client certificate (PEM) for servers that ask for one; empty: none is sent."""
    key_file: str = ""
    """The client certificate's private key; empty: it is in ``cert_file``. Its passphrase, if
    any, is the secret ``LINK_tls_key_password``."""
    verify_hostname: bool = True
    """The certificate must name the host connected to; false still verifies the chain."""


class MySQLSettings(Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 3306
    user: str = "payd"
    database: str = "payd"
    pool_size: Annotated[int, msgspec.Meta(ge=2, le=200)] = 8
    connect_timeout_s: PositiveFloat = 5.0
    pool_recycle_s: PositiveFloat = 300.0
    """A pooled connection idle longer than this is closed, not reused: after a failover behind a
    virtual address, connections opened before it may still reach the old primary."""
    acquire_timeout_s: PositiveFloat = 10.0
    """Waiting for a pooled connection, opening one (TCP, handshake, session set-up) included."""
    query_timeout_s: PositiveFloat = 30.0
    """Each round trip of a transaction (a statement, the commit); the connection is then closed."""
    probe_timeout_s: PositiveFloat = 3.0
    """The health probe's whole look at the database; beyond it ``/readyz`` turns red."""
    tls: TlsSettings | None = None
    """Present (even as an empty table): the link is encrypted and the server verified."""

    @property
    def effective_tls(self) -> TlsSettings | None:
        return self.tls


class RabbitMQSettings(Section, frozen=True):
    url: str = "amqp://payd@127.0.0.1:5672/"
    """The broker, when there is one node; ``urls`` takes its place for a cluster."""
    urls: list[str] = msgspec.field(default_factory=list)
    """The cluster's nodes, each an ``amqp(s)://`` URL; tried in ``node_order``, the first that
    answers is used, and on losing it payd moves to another. Empty: ``url`` alone."""
    node_order: Literal["listed", "shuffled"] = "listed"
    """``shuffled`` spreads a fleet sharing one list over the nodes at random."""
    connect_timeout_s: PositiveFloat = 5.0
    """How long one node may take to accept a connection before the next is tried."""
    quorum_initial_group_size: Annotated[int, msgspec.Meta(ge=1, le=99)] | None = None
    """Replicas of a newly declared quorum queue (``x-quorum-initial-group-size``); unset: the
    broker's default (every node). Odd, and at most the cluster's size (docs/scaling.md)."""
    namespace: Name = "payd"
    """Prefix of every queue and exchange: ``payd`` gives ``payd.attempts``, ``payd.events``."""
    prefetch: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 2000
    delivery_limit: Annotated[int, msgspec.Meta(ge=2)] = 50
    reconnect_delay_s: PositiveFloat = 1.0
    tls: TlsSettings | None = None
    """How an ``amqps://`` link is verified; without it, against the system's CAs."""

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self.urls) if self.urls else (self.url,)

    @property
    def effective_tls(self) -> TlsSettings | None:
        """One TLS setting for every node: a cluster is encrypted throughout or not at all."""
        return (self.tls or TlsSettings()) if _scheme(self.nodes[0]) == "amqps" else None


class RedisSettings(Section, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    """The Redis server; with ``sentinels``, only its scheme (TLS), credentials' user and database
    number count, the master's address coming from the Sentinels."""
    sentinels: list[str] = msgspec.field(default_factory=list)
    """``host:port`` of each Redis Sentinel; set, payd asks them for ``sentinel_service``'s master
    and follows it through a failover."""
    sentinel_service: str = "payd"
    """The master's name in the Sentinels' configuration (``sentinel monitor NAME ...``)."""
    key_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}\Z")] = "payd"
    """Every key payd writes starts with it: one fleet's halt never stops another sharing Redis."""
    halt_grace_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    """How long the last halt state read is kept when the halt keys cannot be read; after that
    no provider is called until they can. Up to 1 s keeps "halted within one second" fleet-wide."""
    tls: TlsSettings | None = None
    """How a ``rediss://`` link is verified; without it, against the system's CAs."""

    @property
    def effective_tls(self) -> TlsSettings | None:
        return (self.tls or TlsSettings()) if _scheme(self.url) == "rediss" else None


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


class HttpSettings(Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 8080


class MonitorSettings(Section, frozen=True):
    """The aiomonitor console for live debugging (``daemon/monitor.py``): off unless asked for."""

    enabled: bool = False
    """Every console session must give the control token first; without one the daemon won't start."""
    host: str = "127.0.0.1"
    port: Port = 20101
    """The terminal console (telnet); give each instance on a host its own."""
    webui: bool = False
    """aiomonitor's web view of the same tasks. It has no authentication and can cancel any task:
    only for a development machine."""
    webui_port: Port = 20102


class PipelineSettings(Section, frozen=True):
    claim_batch_size: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 250
    record_batch_size: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 250
    batch_delay_ms: NonNegativeFloat = 5.0
    """How long a batch waits for company before it is flushed anyway."""
    lease_s: PositiveFloat = 120.0
    """How long a claimed attempt may stay in_flight before other instances treat it as unknown."""
    reconcile_interval_s: PositiveFloat = 1.0
    reconcile_backoff_s: list[PositiveFloat] = msgspec.field(
        default_factory=lambda: [2.0, 10.0, 60.0, 300.0, 1800.0]
    )
    """Waits between lookups of an unknown attempt; the last one repeats."""
    reconcile_batch_size: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 200
    resend_after_s: NonNegativeFloat = 60.0
    """An unknown attempt the provider has no record of is sent again (same key) only after this long."""
    not_found_grace_s: NonNegativeFloat = 300.0
    """An unknown attempt the provider has no record of becomes failed only after this long."""
    queued_orphan_after_s: PositiveFloat = 3600.0
    """A queued attempt nobody claimed for this long (its message is gone) fails as never_sent."""
    pending_reversal_alert_s: PositiveFloat = 86400.0
    """A refund or void the provider accepted but has not decided for this long is counted in
    ``payd_refunds_pending_stale`` and logged (``refund.pending_stale``) for an operator."""


class OutboxSettings(Section, frozen=True):
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 500
    poll_interval_s: PositiveFloat = 0.5


# -- subscriptions: renewals, dunning and the retry budget (docs/subscriptions.md) --

NextStatus = Literal["canceled", "past_due"]
PlanName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
DAY_S = 86400.0


class DunningOverride(Section, frozen=True):
    """``[subscriptions.dunning.plans.NAME]`` or ``[...providers.NAME]``: a key left out inherits."""

    schedule_s: Annotated[list[PositiveFloat], msgspec.Meta(max_length=100)] | None = None
    on_exhausted: NextStatus | None = None
    on_hard_decline: NextStatus | None = None


class DunningSettings(Section, frozen=True):
    schedule_s: Annotated[list[PositiveFloat], msgspec.Meta(max_length=100)] = msgspec.field(
        default_factory=lambda: [1 * DAY_S, 3 * DAY_S, 5 * DAY_S, 7 * DAY_S]
    )
    """Wait before the retry after the 1st, 2nd, ... soft decline of a cycle; its length is the
    number of retries. A provider's earliest-retry advice (``retry_after_s``) lengthens a wait."""
    on_exhausted: NextStatus = "canceled"
    """Where a subscription goes when the schedule runs out (a network limit defers, never stops)."""
    on_hard_decline: NextStatus = "canceled"
    """Where a hard decline or a never-retry code sends it (at once, no further try)."""
    failed_retry_s: PositiveFloat = 900.0
    """Wait before trying again after an attempt that charged nothing (provider down, 429s)."""
    retry_jitter_s: NonNegativeFloat = 600.0
    """Retries spread over up to this long (at most a tenth of their wait)."""
    do_not_retry_codes: list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] = msgspec.field(
        default_factory=list
    )
    """Decline codes that stop dunning, besides the networks' never-retry codes (always on)."""
    plans: dict[PlanName, dict[str, Any]] = msgspec.field(default_factory=dict)
    providers: dict[Name, dict[str, Any]] = msgspec.field(default_factory=dict)


class RetryBudgetSettings(Section, frozen=True):
    """The card networks' retry limits as payd enforces them (docs/subscriptions.md): declines
    and declined reattempts only, never approvals nor tries that never reached the issuer."""

    visa_rule: Literal["2021", "2026"] = "2021"
    """Which Visa excessive-reattempt rule applies: 15 (2021) or 20 (2025 revision) in 30 days."""
    visa: PositiveInt | None = None
    """Declined reattempts per card, amount and currency in 30 days; default and ceiling: the rule's."""
    mastercard_daily: PositiveInt | None = None
    """Declines per card in 24 hours; default and ceiling: 10."""
    mastercard: PositiveInt | None = None
    """Declines per card in 30 days; default and ceiling: 35."""
    pending_recheck_s: PositiveFloat = 60.0
    """A try held back only because tries still under way on the card may yet be declines is
    looked at again after this long."""

    def rules(self) -> dict[str, NetworkRule]:
        return network_rules(
            visa_rule=self.visa_rule,
            visa=self.visa or VISA_LIMITS[self.visa_rule],
            mastercard_daily=self.mastercard_daily or MASTERCARD_DAILY_LIMIT,
            mastercard=self.mastercard or MASTERCARD_MONTHLY_LIMIT,
        )


class SubscriptionSettings(Section, frozen=True):
    scheduler: bool = True
    """Run the renewal scheduler inside ``payd run`` (every instance may; they share the work)."""
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 500
    dispatch_rate_per_s: PositiveFloat = 1000.0
    """Renewals and retries dispatched per second by this instance (token bucket)."""
    poll_interval_s: PositiveFloat = 1.0
    """Pause between scans once nothing is due."""
    renewal_jitter_s: NonNegativeFloat = 3600.0
    """Renewals fall due up to this long after their period ends, spread per subscription."""
    dispatch_timeout_s: PositiveFloat = 3600.0
    """A dispatched try with no recorded outcome after this long is looked at again."""
    dunning: DunningSettings = DunningSettings()
    retry_budget: RetryBudgetSettings = RetryBudgetSettings()


class _RawConfig(Section, frozen=True):
    daemon: DaemonSettings = DaemonSettings()
    gelf: GelfSettings = GelfSettings()
    mysql: MySQLSettings = MySQLSettings()
    rabbitmq: RabbitMQSettings = RabbitMQSettings()
    redis: RedisSettings = RedisSettings()
    http: HttpSettings = HttpSettings()
    monitor: MonitorSettings = MonitorSettings()
    pipeline: PipelineSettings = PipelineSettings()
    outbox: OutboxSettings = OutboxSettings()
    providers: dict[Name, dict[str, Any]] = msgspec.field(default_factory=dict)
    subscriptions: SubscriptionSettings = SubscriptionSettings()


class Config(Section, frozen=True):
    daemon: DaemonSettings
    gelf: GelfSettings
    mysql: MySQLSettings
    rabbitmq: RabbitMQSettings
    redis: RedisSettings
    http: HttpSettings
    monitor: MonitorSettings
    pipeline: PipelineSettings
    outbox: OutboxSettings
    providers: dict[str, ProviderConfig]
    subscriptions: SubscriptionSettings = SubscriptionSettings()
    source: str = "<memory>"
    deprecations: tuple[str, ...] = ()
    """Old spellings of keys this file still uses (``providers.NAME.KEY is now NEW``), to warn of."""

    @property
    def instance_id(self) -> str:
        return self.daemon.instance_id or f"{socket.gethostname()}:{os.getpid()}"


_PATH_IN_MESSAGE = re.compile(r" - at `\$(?P<path>[^`]*)`\Z")


def _explain(error: msgspec.ValidationError | msgspec.DecodeError, prefix: str = "") -> str:
    """Turn msgspec's ``... - at `$.mysql.port``` into ``mysql.port: ...``."""
    message = str(error)
    match = _PATH_IN_MESSAGE.search(message)
    if match is None:
        return f"{prefix}: {message}" if prefix else message
    path = match.group("path").lstrip(".")
    path = re.sub(r"\[(?:'|\")?([^\]'\"]+)(?:'|\")?\]", r".\1", path).lstrip(".")
    full = ".".join(part for part in (prefix, path) if part)
    reason = message[: match.start()]
    return f"{full}: {reason}" if full else reason


def parse_config(text: str | bytes, source: str = "<memory>") -> Config:
    """Decode a TOML document into a ``Config``; raise ``ConfigError`` naming the bad key."""
    try:
        raw = msgspec.toml.decode(text, type=_RawConfig)
    except msgspec.ValidationError as error:
        raise ConfigError(f"{source}: {_explain(error)}") from None
    except msgspec.DecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None

    providers: dict[str, ProviderConfig] = {}
    for name, table in raw.providers.items():
        prefix = f"providers.{name}"
        kind = table.get("kind")
        if not isinstance(kind, str):
            raise ConfigError(f'{source}: {prefix}.kind: required, the provider kind (e.g. "sandbox")')
        try:
            config_type = provider_config_type(kind)
        except LookupError as error:
            raise ConfigError(f"{source}: {prefix}.kind: {error}") from None
        try:
            providers[name] = msgspec.convert(table, type=config_type)
        except msgspec.ValidationError as error:
            raise ConfigError(f"{source}: {_explain(error, prefix)}") from None
    if not providers:
        raise ConfigError(f"{source}: providers: at least one [providers.NAME] table is required")
    for name, provider in providers.items():
        target = provider.failover_to
        if target is None:
            continue
        if target == name or target not in providers:
            raise ConfigError(f"{source}: providers.{name}.failover_to: must name another provider")
        if providers[target].kind != provider.kind:
            raise ConfigError(
                f"{source}: providers.{name}.failover_to: {target!r} is of kind {providers[target].kind!r}; "
                f"a payment method of {provider.kind!r} means nothing there"
            )
    if raw.pipeline.lease_s <= max(p.timeout_s for p in providers.values()) * 2:
        raise ConfigError(
            f"{source}: pipeline.lease_s: must exceed twice the largest provider timeout_s, "
            "or live attempts would be taken for dead ones"
        )
    _check_subscriptions(raw.subscriptions, providers, source)
    _check_tls(raw, source)
    return Config(
        daemon=raw.daemon,
        gelf=raw.gelf,
        mysql=raw.mysql,
        rabbitmq=raw.rabbitmq,
        redis=raw.redis,
        http=raw.http,
        monitor=raw.monitor,
        pipeline=raw.pipeline,
        outbox=raw.outbox,
        providers=providers,
        subscriptions=raw.subscriptions,
        source=source,
        deprecations=tuple(
            f"providers.{name}.{renamed}"
            for name, table in providers.items()
            for renamed in table.deprecated_keys()
        ),
    )


def _check_subscriptions(
    settings: SubscriptionSettings, providers: dict[str, ProviderConfig], source: str
) -> None:
    """Dunning overrides must be well-formed and name real providers; no retry budget may
    exceed what its card network allows, and no schedule may break a network rule by itself."""
    dunning = settings.dunning
    for group, overrides in (("plans", dunning.plans), ("providers", dunning.providers)):
        for name, table in overrides.items():
            prefix = f"subscriptions.dunning.{group}.{name}"
            if group == "providers" and name not in providers:
                raise ConfigError(f"{source}: {prefix}: no provider of that name is configured")
            try:
                msgspec.convert(table, type=DunningOverride)
            except msgspec.ValidationError as error:
                raise ConfigError(f"{source}: {_explain(error, prefix)}") from None
    budget = settings.retry_budget
    visa_rule = f"Visa's {budget.visa_rule} excessive-reattempt rule"
    for key, value, ceiling, rule in (
        ("visa", budget.visa, VISA_LIMITS[budget.visa_rule], visa_rule),
        ("mastercard_daily", budget.mastercard_daily, MASTERCARD_DAILY_LIMIT, "Mastercard's 24-hour limit"),
        ("mastercard", budget.mastercard, MASTERCARD_MONTHLY_LIMIT, "Mastercard's 30-day limit"),
    ):
        if value is not None and value > ceiling:
            raise ConfigError(
                f"{source}: subscriptions.retry_budget.{key}: {value} exceeds {ceiling}, "
                f"the most {rule} allows"
            )
    # A schedule that breaks a rule on its own would be deferred on every card it dunned.
    rules = [budget.rules()[name] for name in EVERY_RULE]
    schedules = [("subscriptions.dunning.schedule_s", dunning.schedule_s)] + [
        (f"subscriptions.dunning.{group}.{name}.schedule_s", table["schedule_s"])
        for group, overrides in (("plans", dunning.plans), ("providers", dunning.providers))
        for name, table in overrides.items()
        if table.get("schedule_s") is not None
    ]
    for key, schedule in schedules:
        problem = schedule_problem(schedule, rules)
        if problem is not None:
            raise ConfigError(f"{source}: {key}: {problem}")


def _check_tls(raw: _RawConfig, source: str) -> None:
    """A TLS table must take effect: a plain URL with one would silently send in the clear."""
    for link, section, scheme in (("rabbitmq", raw.rabbitmq, "amqps"), ("redis", raw.redis, "rediss")):
        if section.tls is not None and section.effective_tls is None:
            raise ConfigError(
                f"{source}: {link}.tls: the url is not {scheme}://, so the link would not be encrypted; "
                f"write {scheme}:// or drop [{link}.tls]"
            )
    schemes = {_scheme(url) for url in raw.rabbitmq.nodes}
    if len(schemes) > 1:
        mixed = " and ".join(sorted(schemes))
        raise ConfigError(f"{source}: rabbitmq.urls: mixes {mixed}; use one scheme for every node")
    for sentinel in raw.redis.sentinels:
        if not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+:\d{1,5}", sentinel):
            raise ConfigError(f"{source}: redis.sentinels: {sentinel!r} is not host:port")
    for link, tls in (("mysql", raw.mysql.tls), ("rabbitmq", raw.rabbitmq.tls), ("redis", raw.redis.tls)):
        if tls is not None and tls.key_file and not tls.cert_file:
            raise ConfigError(f"{source}: {link}.tls.key_file: needs cert_file, the certificate of that key")


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    return parse_config(text, source=str(path))
