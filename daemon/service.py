"""``payd run``: open everything in order, serve until told to stop, drain, close in reverse.

Signals only set events (see ``daemon.cli``), so tests drive the same code by
setting ``shutdown`` themselves. Background duties live in a service tree
(``daemon.supervisor``): declared below with their tier, started together,
stopped tier by tier as the drain proceeds.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import redis.asyncio as aioredis
import structlog

from daemon.broker import BROKER_ERRORS, Broker
from daemon.config import Config, DaemonSettings
from daemon.control import ControlState, start_control
from daemon.halt import HaltKeys, HaltState
from daemon.logs import set_log_level
from daemon.metrics import Metrics
from daemon.monitor import start_monitor
from daemon.notify import SystemdNotifier
from daemon.operator.http import OperatorTools
from daemon.pipeline.attempts import AttemptPipeline
from daemon.pipeline.execute import Lane, breaker_for
from daemon.pipeline.limiter import ProviderLimiter
from daemon.pipeline.ratelimit import rate_limit_for
from daemon.pipeline.reconcile import Reconciler
from daemon.pipeline.relay import OutboxRelay
from daemon.probe import HealthProbe
from daemon.providers.registry import create_provider
from daemon.redis_link import open_redis
from daemon.reload import watch_reloads
from daemon.secrets import load_secret
from daemon.startup import url_address, with_retries
from daemon.storage.db import DB_ERRORS, close_pool, open_pool
from daemon.storage.identity import instance_identity
from daemon.subscriptions.policy import SubscriptionPolicy
from daemon.subscriptions.scheduler import build_scheduler
from daemon.supervisor import FaultInjector, RestartPolicy, Supervisor, Tier
from daemon.webhooks import WebhookReceiver

log = structlog.get_logger("payd")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _restart_policy(settings: DaemonSettings) -> RestartPolicy:
    return RestartPolicy(
        backoff_s=tuple(settings.duty_restart_backoff_s),
        failing_after=settings.duty_failing_after,
        stable_after_s=settings.duty_stable_after_s,
    )


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


def _reloader(
    config: Config, lanes: dict[str, Lane], redis_client: aioredis.Redis, reload: asyncio.Event
) -> Callable[[], Awaitable[None]]:
    """The SIGHUP duty: re-read the configuration whenever ``reload`` is set."""
    return functools.partial(
        watch_reloads,
        reload,
        config,
        lanes,
        rate_factory=lambda name, provider: rate_limit_for(
            name, provider, redis_client, config.redis.key_prefix
        ),
        set_log_level=set_log_level,
    )


async def _open_control(
    config: Config, state: ControlState, stack: AsyncExitStack, shutdown: asyncio.Event
) -> None:
    """The control endpoint, and the aiomonitor console when enabled."""
    runner = await start_control(state, config.http.host, config.http.port)
    stack.push_async_callback(runner.cleanup)
    if config.monitor.enabled:
        monitor = start_monitor(
            state,
            shutdown,
            host=config.monitor.host,
            port=config.monitor.port,
            webui_port=config.monitor.webui_port if config.monitor.webui else None,
        )
        stack.callback(monitor.close)


async def _drain(
    config: Config,
    *,
    pipeline: AttemptPipeline,
    duties: Supervisor,
    notifier: SystemdNotifier,
    force: asyncio.Event,
) -> None:
    """The drain, step by step; the exit stack then closes connections in reverse order of opening."""
    deadline = time.monotonic() + config.daemon.drain_timeout_s
    log.info("daemon.draining", drain_timeout_s=config.daemon.drain_timeout_s)
    notifier.stopping(config.daemon.drain_timeout_s)
    # Intake stops, and with it every duty that makes new work.
    await pipeline.stop_intake()
    await duties.stop(Tier.WORK)
    # The pipeline drains: calls on the wire finish, outcomes commit, deliveries are settled.
    await pipeline.drain(deadline, force)
    # The relay flushes what those commits wrote, and stops (a second signal: it is cut short).
    remaining = max(0.5, deadline - time.monotonic())
    await duties.stop(Tier.EVENTS, graceful=not force.is_set(), finish_within_s=remaining)
    # The links close last: acks and the last events needed them.
    await duties.stop(Tier.LINKS)


async def serve(
    config: Config,
    *,
    shutdown: asyncio.Event,
    force: asyncio.Event | None = None,
    reload: asyncio.Event | None = None,
    on_ready: Callable[[], None] = lambda: None,
    before_intake: Callable[[], None] = lambda: None,
    faults: FaultInjector | None = None,
) -> int:
    """Run the daemon until ``shutdown`` is set; return the process exit status.

    ``force`` (a second signal) cuts the drain short: the process exits at
    once, leaving unfinished attempts to leases and redelivery. ``reload``
    (SIGHUP) re-reads the configuration and applies what can change live.
    ``faults`` is for tests only: it makes named duties crash on demand. ``before_intake``
    runs once everything is set up, just before the broker delivers the first message
    (``payd run`` sets the garbage collector up there, ``daemon.runtime``).
    """
    force = force or asyncio.Event()
    reload = reload or asyncio.Event()
    instance_id = config.instance_id
    structlog.contextvars.bind_contextvars(instance=instance_id)
    metrics = Metrics()
    notifier = SystemdNotifier()
    duties = Supervisor(metrics=metrics, policy=_restart_policy(config.daemon), faults=faults)
    # Passed to everything that records outcomes, as an argument: no task can miss it.
    policy = SubscriptionPolicy(config.subscriptions)

    async with AsyncExitStack() as stack:
        stack.callback(notifier.close)
        # Pinged while the loop turns and no critical duty keeps crashing.
        watchdog = asyncio.create_task(notifier.watchdog_loop(lambda: duties.critical_ok), name="watchdog")
        stack.push_async_callback(_cancel, watchdog)
        pool = await with_retries(
            "mysql",
            f"{config.mysql.host}:{config.mysql.port}",
            lambda: open_pool(config.mysql, load_secret("mysql_password")),
            give_up_after=config.daemon.startup_timeout_s,
            errors=DB_ERRORS,
        )
        stack.push_async_callback(close_pool, pool)
        await stack.enter_async_context(
            instance_identity(
                config.mysql, load_secret("mysql_password"), pool, instance_id=instance_id, metrics=metrics
            )
        )

        # Redis not answering is no reason to exit: the halt state starts unknown, and an
        # instance that cannot read it calls no provider (daemon.halt); /readyz says why.
        redis_client = await open_redis(config.redis, load_secret("redis_password"))
        stack.push_async_callback(redis_client.aclose)
        halt = HaltState(
            config.providers, HaltKeys(config.redis.key_prefix), grace_s=config.redis.halt_grace_s
        )
        lanes = _open_lanes(config, stack, redis_client, halt)

        broker = Broker(config.rabbitmq, load_secret("rabbitmq_password"), metrics.broker_reconnects.inc)
        await with_retries(
            "rabbitmq",
            ", ".join(url_address(node) for node in config.rabbitmq.nodes),
            broker.connect,
            give_up_after=config.daemon.startup_timeout_s,
            errors=BROKER_ERRORS,
        )
        stack.push_async_callback(broker.close)

        relay = OutboxRelay(pool=pool, broker=broker, settings=config.outbox, metrics=metrics)
        pipeline = AttemptPipeline(
            pool=pool,
            broker=broker,
            lanes=lanes,
            settings=config.pipeline,
            metrics=metrics,
            instance_id=instance_id,
            policy=policy,
            on_recorded=relay.wake,
        )
        reconciler = Reconciler(
            pool=pool,
            lanes=lanes,
            settings=config.pipeline,
            metrics=metrics,
            policy=policy,
            on_recorded=relay.wake,
        )
        probe = HealthProbe(pool, broker, metrics)
        scheduler = build_scheduler(
            config, pool=pool, policy=policy, providers=lanes, metrics=metrics, wake=relay.wake
        )
        # The service tree: a new duty is one line, in the tier that says when it stops. Critical
        # duties keep payd's promises (the broker link, the emergency stop, events out, unknowns
        # settled): when one keeps crashing, systemd restarts the process.
        duties.add("broker-link", broker.supervise, tier=Tier.LINKS, critical=True)
        duties.add("halt-watcher", lambda: halt.watch(redis_client), tier=Tier.LINKS, critical=True)
        duties.add("outbox-relay", relay.run, tier=Tier.EVENTS, critical=True, stop=relay.stop)
        duties.add("reconciler", reconciler.run, tier=Tier.WORK, critical=True)
        duties.add("health-probe", probe.run, tier=Tier.WORK)
        duties.add("config-reloader", _reloader(config, lanes, redis_client, reload), tier=Tier.WORK)
        if scheduler is not None:
            duties.add("renewal-scheduler", scheduler.run, tier=Tier.WORK)
        duties.start()
        stack.push_async_callback(duties.stop_all)

        control = ControlState(
            instance_id=instance_id,
            broker=broker,
            pipeline=pipeline,
            metrics=metrics,
            database_ok=lambda: probe.database_ok,
            duties=duties,
            parked=lambda: {"fleet": probe.parked_attempts, "recent": list(reconciler.parked)},
            halt=halt,
            redis=redis_client,
            control_token=load_secret("control_token"),
            operator=OperatorTools(pool=pool, config=config, policy=policy, instance_id=instance_id),
            webhooks=WebhookReceiver(pool=pool, lanes=lanes, metrics=metrics, on_recorded=relay.wake),
        )
        await _open_control(config, control, stack, shutdown)

        pipeline.start()
        before_intake()
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
        await _drain(config, pipeline=pipeline, duties=duties, notifier=notifier, force=force)
    log.info("daemon.stopped", forced=force.is_set())
    return 1 if force.is_set() else 0
