"""``payd run``: open everything in order, serve until told to stop, drain, close in reverse.

Signals only set events (see ``daemon.cli``), so tests drive the same code by
setting ``shutdown`` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import redis.asyncio as aioredis
import structlog

from daemon.broker import BROKER_ERRORS, Broker
from daemon.config import Config
from daemon.control import ControlState, start_control
from daemon.halt import HaltKeys, HaltState
from daemon.logs import set_log_level
from daemon.metrics import Metrics
from daemon.monitor import start_monitor
from daemon.notify import SystemdNotifier
from daemon.pipeline.attempts import AttemptPipeline
from daemon.pipeline.execute import Lane, breaker_for
from daemon.pipeline.limiter import ProviderLimiter
from daemon.pipeline.ratelimit import rate_limit_for
from daemon.pipeline.reconcile import Reconciler
from daemon.pipeline.relay import OutboxRelay
from daemon.probe import HealthProbe
from daemon.providers.registry import create_provider
from daemon.reload import watch_reloads
from daemon.secrets import Secret, load_secret
from daemon.storage.db import DB_ERRORS, close_pool, open_pool
from daemon.subscriptions.scheduler import start_subscriptions

log = structlog.get_logger("payd")

STARTUP_RETRY_S = 30.0


async def _with_retries(what: str, action: Callable[[], Awaitable[Any]], give_up_after: float) -> Any:
    """Start-up dependencies get a bounded grace period, then payd exits non-zero for systemd."""
    deadline = time.monotonic() + give_up_after
    delay = 0.5
    while True:
        try:
            return await action()
        except (*DB_ERRORS, *BROKER_ERRORS) as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("startup.waiting", dependency=what, error=repr(error), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _reveal(secret: Secret | None) -> str | None:
    return secret.reveal() if secret else None


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _open_lanes(
    config: Config, stack: AsyncExitStack, redis_client: aioredis.Redis, halt: HaltState
) -> dict[str, Lane]:
    """One lane per configured provider: its adapter and the protections around it."""
    lanes: dict[str, Lane] = {}
    for name, provider_config in config.providers.items():
        provider = create_provider(name, provider_config)
        stack.push_async_callback(provider.close)
        lanes[name] = Lane(
            name=name,
            provider=provider,
            config=provider_config,
            limiter=ProviderLimiter(provider_config.max_in_flight),
            breaker=breaker_for(provider_config),
            rate=rate_limit_for(name, provider_config, redis_client, config.redis.key_prefix),
            halt=halt,
        )
    return lanes


async def serve(
    config: Config,
    *,
    shutdown: asyncio.Event,
    force: asyncio.Event | None = None,
    reload: asyncio.Event | None = None,
    on_ready: Callable[[], None] = lambda: None,
) -> int:
    """Run the daemon until ``shutdown`` is set; return the process exit status.

    ``force`` (a second signal) cuts the drain short: the process exits at
    once, leaving unfinished attempts to leases and redelivery. ``reload``
    (SIGHUP) re-reads the configuration and applies what can change live.
    """
    force = force or asyncio.Event()
    reload = reload or asyncio.Event()
    instance_id = config.instance_id
    structlog.contextvars.bind_contextvars(instance=instance_id)
    metrics = Metrics()
    notifier = SystemdNotifier()

    async with AsyncExitStack() as stack:
        stack.callback(notifier.close)
        watchdog = asyncio.create_task(notifier.watchdog_loop(), name="systemd-watchdog")
        stack.push_async_callback(_cancel, [watchdog])
        pool = await _with_retries(
            "mysql",
            lambda: open_pool(config.mysql, load_secret("mysql_password")),
            STARTUP_RETRY_S,
        )
        stack.push_async_callback(close_pool, pool)

        redis_client = aioredis.from_url(config.redis.url, password=_reveal(load_secret("redis_password")))
        stack.push_async_callback(redis_client.aclose)
        halt = HaltState(config.providers, HaltKeys(config.redis.key_prefix))
        lanes = _open_lanes(config, stack, redis_client, halt)

        broker = Broker(config.rabbitmq, load_secret("rabbitmq_password"))
        await _with_retries("rabbitmq", broker.connect, STARTUP_RETRY_S)
        stack.push_async_callback(broker.close)

        relay = OutboxRelay(pool=pool, broker=broker, settings=config.outbox, metrics=metrics)
        pipeline = AttemptPipeline(
            pool=pool,
            broker=broker,
            lanes=lanes,
            settings=config.pipeline,
            metrics=metrics,
            instance_id=instance_id,
            on_recorded=relay.wake,
        )
        reconciler = Reconciler(
            pool=pool,
            lanes=lanes,
            settings=config.pipeline,
            metrics=metrics,
            on_recorded=relay.wake,
        )
        probe = HealthProbe(pool, broker, metrics)

        # Before any task that records outcomes starts: they follow this daemon's [subscriptions].
        renewals = start_subscriptions(config, pool=pool, providers=lanes, metrics=metrics, wake=relay.wake)
        # Background duties; the relay outlives the drain so the last events go out.
        duties = [
            asyncio.create_task(broker.supervise(), name="broker-supervisor"),
            asyncio.create_task(halt.watch(redis_client), name="halt-watcher"),
            asyncio.create_task(reconciler.run(), name="reconciler"),
            asyncio.create_task(probe.run(), name="health-probe"),
            asyncio.create_task(
                watch_reloads(
                    reload,
                    config,
                    lanes,
                    rate_factory=lambda name, provider: rate_limit_for(
                        name, provider, redis_client, config.redis.key_prefix
                    ),
                    set_log_level=set_log_level,
                ),
                name="config-reloader",
            ),
            *renewals,
        ]
        relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
        stack.push_async_callback(_cancel, [relay_task])
        stack.push_async_callback(_cancel, duties)

        state = ControlState(
            instance_id=instance_id,
            broker=broker,
            pipeline=pipeline,
            metrics=metrics,
            database_ok=lambda: probe.database_ok,
            halt=halt,
            redis=redis_client,
            control_token=load_secret("control_token"),
        )
        runner = await start_control(state, config.http.host, config.http.port)
        stack.push_async_callback(runner.cleanup)
        if config.monitor.enabled:
            monitor = start_monitor(
                state,
                shutdown,
                host=config.monitor.host,
                port=config.monitor.port,
                webui_port=config.monitor.webui_port,
            )
            stack.callback(monitor.close)

        pipeline.start()
        await broker.start_consuming(pipeline.on_message)
        log.info(
            "daemon.ready",
            providers=sorted(lanes),
            queue=broker.topology.attempts_queue,
            control=f"http://{config.http.host}:{config.http.port}",
        )
        notifier.ready()
        on_ready()

        await shutdown.wait()
        deadline = time.monotonic() + config.daemon.drain_timeout_s
        log.info("daemon.draining", drain_timeout_s=config.daemon.drain_timeout_s)
        notifier.stopping(config.daemon.drain_timeout_s)
        await _cancel(duties[2:])  # reconciliation and probing stop; the broker link and halt watch stay
        await pipeline.drain(deadline, force)
        if not force.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(relay.publish_pending(), max(0.5, deadline - time.monotonic()))
    log.info("daemon.stopped", forced=force.is_set())
    return 1 if force.is_set() else 0
