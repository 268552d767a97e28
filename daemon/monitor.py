"""The aiomonitor console, with payd's own commands, for live debugging on localhost.

Connect with ``python -m aiomonitor.cli -H 127.0.0.1 -p PORT`` (or telnet).
Besides aiomonitor's task commands (``ps``, ``where``, ``cancel``, ...):

    providers              limits, in-flight, waiting, breaker, halt per provider
    inflight [PROVIDER]    attempts held right now, with their progress
    limit PROVIDER N       change a provider's in-flight limit until the next reload
    halt [--provider P]    fleet-wide emergency stop (as ``payd halt``)
    resume [--provider P]  lift it
    drain                  start a graceful drain, as SIGTERM does

Commands run in the monitor's thread; everything that reads or changes the
daemon is handed to the daemon's event loop and awaited from there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiomonitor
import click
from aiomonitor.termui.commands import auto_command_done, custom_help_option, print_fail, print_ok
from terminaltables import AsciiTable

from daemon.control import ControlState
from daemon.halt import clear_halt, set_halt

T = TypeVar("T")


class PaydMonitor(aiomonitor.Monitor):
    """An aiomonitor bound to one daemon's control state."""

    payd: ControlState
    shutdown: asyncio.Event


def _on_daemon_loop(monitor: PaydMonitor, call: Callable[[], Awaitable[T]], timeout: float = 10) -> T:
    """Run ``call`` on the daemon's loop and wait for it from the monitor thread."""
    loop: asyncio.AbstractEventLoop = monitor._monitored_loop  # aiomonitor offers no accessor

    async def run() -> T:
        return await call()

    return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)


def _echo_table(rows: list[list[Any]]) -> None:
    click.echo(AsciiTable(rows).table)


@aiomonitor.monitor_cli.command(name="providers")
@custom_help_option
@auto_command_done
def do_providers(ctx: click.Context) -> None:
    """Limits, in-flight calls, waiters, breaker and halt per provider"""
    monitor: PaydMonitor = ctx.obj

    async def snapshot() -> dict[str, Any]:
        return monitor.payd.status()

    status = _on_daemon_loop(monitor, snapshot)
    rows = [["provider", "limit", "in flight", "waiting", "peak", "breaker", "halted"]]
    for name, lane in status["providers"].items():
        rows.append(
            [
                name,
                lane["limit"],
                lane["in_flight"],
                lane["waiting"],
                lane["peak_in_flight"],
                lane["breaker"],
                lane["halted"],
            ]
        )
    _echo_table(rows)
    click.echo(f"draining: {status['draining']}   halt: {status['halt']}")


@aiomonitor.monitor_cli.command(name="inflight")
@click.argument("provider", required=False)
@custom_help_option
@auto_command_done
def do_inflight(ctx: click.Context, provider: str | None) -> None:
    """Attempts this instance holds now, optionally for one provider"""
    monitor: PaydMonitor = ctx.obj

    async def collect() -> list[list[Any]]:
        now = time.monotonic()
        return [
            [
                run.request.idempotency_key,
                run.request.provider,
                run.tries,
                "calling" if run.calling else "waiting",
                f"{now - run.started:.1f}",
            ]
            for run in monitor.payd.pipeline.running.values()
            if provider is None or run.request.provider == provider
        ]

    rows = _on_daemon_loop(monitor, collect)
    _echo_table([["idempotency key", "provider", "tries", "phase", "age s"], *rows[:200]])
    click.echo(f"{len(rows)} attempts" + (" (first 200 shown)" if len(rows) > 200 else ""))


@aiomonitor.monitor_cli.command(name="limit")
@click.argument("provider")
@click.argument("limit", type=int)
@custom_help_option
@auto_command_done
def do_limit(ctx: click.Context, provider: str, limit: int) -> None:
    """Set a provider's in-flight limit (until the next reload or restart)"""
    monitor: PaydMonitor = ctx.obj
    lanes = monitor.payd.pipeline.lanes
    if provider not in lanes or limit < 1:
        print_fail(f"usage: limit PROVIDER N (N >= 1); providers: {', '.join(lanes)}")
        return

    async def change() -> None:
        lanes[provider].limiter.set_limit(limit)

    _on_daemon_loop(monitor, change)
    print_ok(f"{provider}: in-flight limit {limit}")


@aiomonitor.monitor_cli.command(name="halt")
@click.option("--provider", default=None)
@click.option("--reason", default="halted from aiomonitor")
@custom_help_option
@auto_command_done
def do_halt(ctx: click.Context, provider: str | None, reason: str) -> None:
    """Fleet-wide emergency stop (every instance, within a second)"""
    monitor: PaydMonitor = ctx.obj
    state = monitor.payd
    if provider is not None and provider not in state.pipeline.lanes:
        print_fail(f"unknown provider {provider!r}")
        return
    _on_daemon_loop(
        monitor,
        lambda: set_halt(
            state.redis,
            state.halt.keys,
            provider=provider,
            reason=reason,
            by=f"aiomonitor:{state.instance_id}",
        ),
    )
    print_ok(f"halted {provider or 'every provider'}")


@aiomonitor.monitor_cli.command(name="resume")
@click.option("--provider", default=None)
@custom_help_option
@auto_command_done
def do_resume(ctx: click.Context, provider: str | None) -> None:
    """Lift the global halt, or one provider's"""
    monitor: PaydMonitor = ctx.obj
    was = _on_daemon_loop(
        monitor, lambda: clear_halt(monitor.payd.redis, monitor.payd.halt.keys, provider=provider)
    )
    print_ok(f"resumed {provider or 'the global halt'}" if was else "it was not halted")


@aiomonitor.monitor_cli.command(name="drain")
@custom_help_option
@auto_command_done
def do_drain(ctx: click.Context) -> None:
    """Start a graceful drain, exactly as SIGTERM does"""
    monitor: PaydMonitor = ctx.obj
    monitor._monitored_loop.call_soon_threadsafe(monitor.shutdown.set)
    print_ok("draining: intake stopped, in-flight attempts finishing")


def start_monitor(
    state: ControlState, shutdown: asyncio.Event, *, host: str, port: int, webui_port: int
) -> PaydMonitor:
    """Start the console; the caller closes it. The Python REPL is off: it would run arbitrary code."""
    monitor = aiomonitor.start_monitor(
        asyncio.get_running_loop(),
        monitor_cls=PaydMonitor,
        host=host,
        port=port,
        webui_port=webui_port,
        console_enabled=False,
    )
    assert isinstance(monitor, PaydMonitor)
    monitor.payd = state
    monitor.shutdown = shutdown
    monitor.prompt = "payd >>> "
    return monitor
