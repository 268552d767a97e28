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

import msgspec

# Re-exported (the alias tells mypy so): callers import both from here, as before.
from daemon.errors import ConfigError as ConfigError  # noqa: PLC0414
from daemon.providers.base import PositiveFloat
from daemon.providers.base import ProviderConfig as ProviderConfig  # noqa: PLC0414
from daemon.providers.registry import provider_config_type
from daemon.subscriptions.networks import MASTERCARD_CEILING, VISA_CEILINGS, strictest_ceiling

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,62}$")]


class Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every configuration table: immutable, keyword-only, unknown keys rejected."""


class DaemonSettings(Section, frozen=True):
    instance_id: str = ""
    """Identifies this process in attempt claims; empty means ``HOSTNAME:PID``."""
    drain_timeout_s: PositiveFloat = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"


class GelfSettings(Section, frozen=True):
    """Logs to Graylog as GELF, besides stdout; off unless ``host`` is set."""

    host: str = ""
    port: Port = 12201
    protocol: Literal["udp", "tcp", "tls"] = "udp"
    tls_ca_file: str = ""
    """CA bundle to verify the Graylog server with ``protocol = "tls"``; empty uses the system's."""
    queue_size: Annotated[int, msgspec.Meta(ge=100)] = 10000
    """Log records buffered for the sender thread; when full, records are dropped and counted."""


class MySQLSettings(Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 3306
    user: str = "payd"
    database: str = "payd"
    pool_size: Annotated[int, msgspec.Meta(ge=2, le=200)] = 8
    connect_timeout_s: PositiveFloat = 5.0


class RabbitMQSettings(Section, frozen=True):
    url: str = "amqp://payd@127.0.0.1:5672/"
    namespace: Name = "payd"
    """Prefix of every queue and exchange: ``payd`` gives ``payd.attempts``, ``payd.events``."""
    prefetch: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 2000
    delivery_limit: Annotated[int, msgspec.Meta(ge=2)] = 50
    reconnect_delay_s: PositiveFloat = 1.0


class RedisSettings(Section, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "payd"
    """Every key payd writes starts with it: one fleet's halt never stops another sharing Redis."""


class HttpSettings(Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 8080


class MonitorSettings(Section, frozen=True):
    """The aiomonitor console for live debugging (``daemon/monitor.py``); localhost only by default."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 20101
    """The terminal console (telnet); give each instance on a host its own."""
    webui_port: Port = 20102
    """aiomonitor's web view of the same tasks."""


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
    """Where a subscription goes when the schedule or the retry budget runs out."""
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
    """Attempts per payment method in the trailing 30 days, first tries included, all providers."""

    visa_rule: Literal["2021", "2026"] = "2021"
    """Which Visa excessive-reattempt rule applies: 15 (2021) or 20 (2026) in 30 days."""
    visa: PositiveInt | None = None
    """Default: the ceiling of ``visa_rule``."""
    mastercard: PositiveInt | None = None
    """Default and ceiling: 35."""
    other: PositiveInt | None = None
    """Any other or unknown brand; default and ceiling: the strictest of the above."""


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


_PATH_IN_MESSAGE = re.compile(r" - at `\$(?P<path>[^`]*)`$")


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
    exceed what its card network allows."""
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
    visa = VISA_CEILINGS[budget.visa_rule]
    for key, value, ceiling, rule in (
        ("visa", budget.visa, visa, f"Visa's {budget.visa_rule} excessive-reattempt rule allows"),
        ("mastercard", budget.mastercard, MASTERCARD_CEILING, "Mastercard's excessive-attempts rule allows"),
        ("other", budget.other, strictest_ceiling(budget.visa_rule), "the strictest network rule allows"),
    ):
        if value is not None and value > ceiling:
            raise ConfigError(
                f"{source}: subscriptions.retry_budget.{key}: {value} exceeds {ceiling}, "
                f"the most {rule} per payment method in 30 days"
            )


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    return parse_config(text, source=str(path))
