"""SIGHUP: re-read the configuration and apply what can change without a restart.

Live: each provider's in-flight limit, rate limits, breaker settings, retry
counts and backoff, and the log level. Everything else (connections, names,
timeouts baked into HTTP sessions, added or removed providers) needs a
restart: a reload that changes it applies the live part and says what it
left. A configuration that does not validate changes nothing, and the log
says why; the daemon keeps running on the old one.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import msgspec
import structlog

from daemon.config import Config, ConfigError, ProviderConfig, load_config
from daemon.pipeline.execute import Lane, breaker_for
from daemon.pipeline.ratelimit import RateLimit

log = structlog.get_logger("payd.reload")

LIVE_PROVIDER_KEYS = frozenset(
    {
        "max_in_flight",
        "max_tries",
        "retry_backoff_s",
        "max_rate_limited_tries",
        "rate_per_s",
        "fleet_rate_per_s",
        "fallback_rate_per_s",
        "burst",
        "breaker_failure_ratio",
        "breaker_min_calls",
        "breaker_window_s",
        "breaker_open_s",
        "breaker_max_open_s",
        "breaker_probes",
    }
)
_BREAKER_KEYS = frozenset(key for key in LIVE_PROVIDER_KEYS if key.startswith("breaker_"))
_RATE_KEYS = frozenset({"rate_per_s", "fleet_rate_per_s", "fallback_rate_per_s", "burst"})


class ReloadReport(msgspec.Struct, kw_only=True):
    applied: list[str] = msgspec.field(default_factory=list)
    needs_restart: list[str] = msgspec.field(default_factory=list)
    error: str | None = None


def _changed_keys(old: msgspec.Struct, new: msgspec.Struct) -> set[str]:
    old_values, new_values = msgspec.structs.asdict(old), msgspec.structs.asdict(new)
    return {
        key for key in old_values.keys() | new_values.keys() if old_values.get(key) != new_values.get(key)
    }


def plan_reload(current: Config, new: Config) -> ReloadReport:
    """What a reload from ``current`` to ``new`` would apply, and what it would leave."""
    report = ReloadReport()
    for section in ("gelf", "mysql", "rabbitmq", "redis", "http", "pipeline", "outbox"):
        report.needs_restart += [
            f"{section}.{key}"
            for key in sorted(_changed_keys(getattr(current, section), getattr(new, section)))
        ]
    for key in sorted(_changed_keys(current.daemon, new.daemon)):
        (report.applied if key == "log_level" else report.needs_restart).append(f"daemon.{key}")
    for name in sorted(current.providers.keys() ^ new.providers.keys()):
        report.needs_restart.append(f"providers.{name} (added or removed)")
    for name in sorted(current.providers.keys() & new.providers.keys()):
        for key in sorted(_changed_keys(current.providers[name], new.providers[name])):
            target = report.applied if key in LIVE_PROVIDER_KEYS else report.needs_restart
            target.append(f"providers.{name}.{key}")
    return report


def apply_provider_config(
    lane: Lane, new: ProviderConfig, rate_factory: Callable[[ProviderConfig], RateLimit]
) -> None:
    """Swap a lane onto a new configuration that differs only in live keys."""
    old, live = lane.config, _live_only(lane.config, new)
    changed = _changed_keys(old, live)
    lane.config = live
    if "max_in_flight" in changed:
        lane.limiter.set_limit(live.max_in_flight)
    if changed & _BREAKER_KEYS:
        lane.breaker = breaker_for(live)
    if changed & _RATE_KEYS:
        lane.rate = rate_factory(live)


def _live_only(old: ProviderConfig, new: ProviderConfig) -> ProviderConfig:
    """``old`` with the live keys taken from ``new``."""
    return msgspec.structs.replace(old, **{key: getattr(new, key) for key in LIVE_PROVIDER_KEYS})


def reload_config(
    current: Config,
    lanes: dict[str, Lane],
    *,
    rate_factory: Callable[[str, ProviderConfig], RateLimit],
    set_log_level: Callable[[str], None],
) -> tuple[Config, ReloadReport]:
    """Re-read ``current.source`` and apply the live part; return the configuration now in force."""
    try:
        new = load_config(current.source)
    except ConfigError as error:
        log.error("reload.rejected", error=str(error), keeping="the running configuration")
        return current, ReloadReport(error=str(error))
    report = plan_reload(current, new)
    for name, lane in lanes.items():
        if name in new.providers:
            apply_provider_config(lane, new.providers[name], functools.partial(rate_factory, name))
    if new.daemon.log_level != current.daemon.log_level:
        set_log_level(new.daemon.log_level)
    if report.needs_restart:
        # The operator changed something that will not take effect until a restart: say so loudly.
        log.warning("reload.applied", applied=report.applied, needs_restart=report.needs_restart)
    else:
        log.info("reload.applied", applied=report.applied)
    in_force = msgspec.structs.replace(
        current,
        daemon=msgspec.structs.replace(current.daemon, log_level=new.daemon.log_level),
        providers={name: lanes[name].config for name in current.providers},
    )
    return in_force, report


async def watch_reloads(
    requests: asyncio.Event,
    config: Config,
    lanes: dict[str, Lane],
    *,
    rate_factory: Callable[[str, ProviderConfig], RateLimit],
    set_log_level: Callable[[str], None],
) -> None:
    """For the daemon's lifetime: reload whenever ``requests`` is set (SIGHUP)."""
    while True:
        await requests.wait()
        requests.clear()
        config, _ = reload_config(config, lanes, rate_factory=rate_factory, set_log_level=set_log_level)
