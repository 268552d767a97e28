"""The aiomonitor console, with payd's own commands, for live debugging on localhost.

Off unless ``[monitor] enabled``. Connect with ``python -m aiomonitor.cli -H
127.0.0.1 -p PORT`` (or telnet); every session first asks for the control token
(not echoed, compared in constant time) and closes on a wrong one, because
every command here is a control path: halt, resume, drain, and aiomonitor's
``cancel``, which could stop the halt watcher. aiomonitor's web UI has no
authentication at all, so it starts only with ``[monitor] webui = true``.
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
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiomonitor
import click
import janus
import structlog
from aiohttp import web
from aiomonitor.termui.commands import (
    auto_command_done,
    custom_help_option,
    interact,
    print_fail,
    print_ok,
)
from aiomonitor.webui.app import init_webui
from prompt_toolkit import PromptSession
from prompt_toolkit.contrib.telnet.server import TelnetConnection, TelnetServer
from terminaltables import AsciiTable

from daemon.config import ConfigError
from daemon.control import ControlState, token_matches
from daemon.halt import clear_halt, set_halt
from daemon.secrets import Secret

log = structlog.get_logger("payd.monitor")

T = TypeVar("T")


class PaydMonitor(aiomonitor.Monitor):
    """An aiomonitor bound to one daemon's control state, its sessions behind the control token."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        state: ControlState,
        shutdown: asyncio.Event,
        token: Secret,
        host: str,
        port: int,
        webui_port: int | None,
    ) -> None:
        # The Python REPL stays off: it would run arbitrary code.
        super().__init__(loop, host=host, termui_port=port, webui_port=webui_port or 0, console_enabled=False)
        self.payd = state
        self.shutdown = shutdown
        self.control_token = token
        self.webui_enabled = webui_port is not None
        self.prompt = "payd >>> "

    async def _ui_main_async(self) -> None:
        """aiomonitor 0.7's UI thread body with two changes: each telnet session logs in with the
        control token before aiomonitor's loop sees it, and the web UI starts only when asked for.
        (aiomonitor offers neither as an option; it is pinned below 0.8 in pyproject.toml.)"""
        loop = asyncio.get_running_loop()
        # Read by aiomonitor's task tracking; their item types are aiomonitor's (untyped) own.
        self._termination_info_queue: janus.Queue[Any] = janus.Queue()
        self._cancellation_chain_queue: janus.Queue[Any] = janus.Queue()
        self._ui_loop = loop
        self._ui_forever_future = loop.create_future()
        self._ui_termination_handler_task = loop.create_task(self._ui_handle_termination_updates())
        self._ui_cancellation_handler_task = loop.create_task(self._ui_handle_cancellation_updates())
        telnet_server = TelnetServer(
            interact=functools.partial(_logged_in_interact, self), host=self._host, port=self._termui_port
        )
        webui_runner: web.AppRunner | None = None
        if self.webui_enabled:
            webui_runner = web.AppRunner(await init_webui(self))
            await webui_runner.setup()
            await web.TCPSite(webui_runner, str(self._host), self._webui_port, reuse_port=True).start()
        telnet_server.start()
        await asyncio.sleep(0)
        self._ui_started.set()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ui_forever_future
        finally:
            sessions = {*self._termui_tasks}
            for session in sessions:
                session.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)
            for handler in (self._ui_termination_handler_task, self._ui_cancellation_handler_task):
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
            await telnet_server.stop()
            if webui_runner is not None:
                await webui_runner.cleanup()


async def _logged_in_interact(monitor: PaydMonitor, connection: TelnetConnection) -> None:
    """Ask for the control token (not echoed); only a match gets aiomonitor's command loop."""
    await asyncio.sleep(0.3)  # as aiomonitor does: let the telnet negotiation finish first
    try:
        given = await PromptSession[str]().prompt_async("control token: ", is_password=True)
    except (EOFError, KeyboardInterrupt):
        return
    peer = "{}:{}".format(*connection.addr)
    if not token_matches(given.strip().encode("utf-8", "surrogateescape"), monitor.control_token):
        log.warning("monitor.login_refused", peer=peer)
        print("not authorised", file=connection.stdout)
        return  # returning closes the connection
    log.info("monitor.login", peer=peer)
    await interact(monitor, connection)


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
    state: ControlState,
    shutdown: asyncio.Event,
    *,
    host: str,
    port: int,
    webui_port: int | None,
) -> PaydMonitor:
    """Start the console (and the web UI if ``webui_port`` is given); the caller closes it."""
    token = state.control_token
    if token is None or not token.reveal():
        raise ConfigError(
            "monitor.enabled: the console needs the control token (secret control_token) "
            "to authenticate its sessions; set it or turn the console off"
        )
    if webui_port is not None:
        log.warning("monitor.webui_unauthenticated", host=host, port=webui_port)
    monitor = PaydMonitor(
        asyncio.get_running_loop(),
        state=state,
        shutdown=shutdown,
        token=token,
        host=host,
        port=port,
        webui_port=webui_port,
    )
    monitor.start()
    return monitor
