"""The service tree: every background duty named, started and stopped in a declared order, supervised.

After mode/faust's ``Service`` and arq's worker. A duty is a coroutine that
runs for the daemon's lifetime (the reconciler, the outbox relay, the broker
link, ...). Nothing it raises goes unseen: a crash is logged with its
traceback, counted in ``payd_duty_crashes_total{duty}``, and the duty is
started again after a backoff. A duty that crashes ``failing_after`` times in
a row (no stable run in between) is *failing*: ``/readyz`` turns red, and for
a critical duty the systemd watchdog stops being pinged, so systemd restarts
the whole process. It is still restarted meanwhile: a transient cause (a
database fail-over, say) heals without anyone's help.

Duties start tier by tier and stop in the reverse order, so the drain reads
in ``serve`` as the steps it is: work that creates work stops, the pipeline
drains, the relay flushes, the links close.
"""

from __future__ import annotations

import asyncio
import enum
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from daemon.metrics import Metrics

DutyRun = Callable[[], Awaitable[None]]
STOP_TIMEOUT_S = 5.0
"""How long a stopped duty may take to unwind before the drain moves on without it."""


class Tier(enum.IntEnum):
    """When a duty runs relative to the others: tiers start in this order and stop in reverse."""

    LINKS = 1
    """The broker link and the halt watch: needed until the last ack and the last event."""
    EVENTS = 2
    """The outbox relay: it flushes once more after the pipeline has drained."""
    WORK = 3
    """Renewals, reconciliation, probing, reloads: they stop as soon as the drain begins."""


class DutyState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    """Crashed; waiting out its backoff before it runs again."""
    FAILING = "failing"
    """Crashed ``failing_after`` times in a row; still restarted, but the instance is not ready."""
    STOPPED = "stopped"


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
    """The wait before the n-th restart in a row; the last value repeats."""
    failing_after: int = 3
    """Crashes in a row after which the duty counts as failing."""
    stable_after_s: float = 60.0
    """A run at least this long ends the streak: the next crash counts as the first."""

    def delay(self, crashes_in_a_row: int) -> float:
        return self.backoff_s[min(crashes_in_a_row, len(self.backoff_s)) - 1]


class Duty:
    """One supervised duty and what is known of its health (read by /status and /readyz)."""

    def __init__(
        self, name: str, run: DutyRun, *, tier: Tier, critical: bool, stop: Callable[[], None] | None
    ) -> None:
        self.name = name
        self.run = run
        self.tier = tier
        self.critical = critical
        self.stop = stop
        """Asks ``run`` to finish its work and return; without it, stopping cancels."""
        self.stopping = False
        self.state = DutyState.STOPPED
        self.crashes = 0
        self.crashes_in_a_row = 0
        self.last_error: str | None = None
        self.task: asyncio.Task[None] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "tier": self.tier.name.lower(),
            "critical": self.critical,
            "crashes": self.crashes,
            "crashes_in_a_row": self.crashes_in_a_row,
            "last_error": self.last_error,
        }


class Supervisor:
    def __init__(
        self, *, metrics: Metrics, policy: RestartPolicy, faults: FaultInjector | None = None
    ) -> None:
        self._metrics = metrics
        self._policy = policy
        self._faults = faults
        # Bound here rather than at import: loggers are cached on first use, and a
        # supervisor's lines should follow the logging set-up in force when it starts.
        self._log = structlog.get_logger("payd.supervisor")
        self.duties: dict[str, Duty] = {}

    def add(
        self,
        name: str,
        run: DutyRun,
        *,
        tier: Tier,
        critical: bool = False,
        stop: Callable[[], None] | None = None,
    ) -> None:
        """Declare a duty; ``critical`` ones restart the process (via the watchdog) when they keep failing.

        Critical means the instance cannot keep payd's promises without it
        (settling unknowns, publishing events, the broker link, the emergency
        stop). The others are restarted but not worth interrupting payments for.
        ``stop``, when given, asks the duty to finish and return (the relay's
        last flush); a duty without one is cancelled, which is fine for duties
        whose work rolls back cleanly.
        """
        if name in self.duties:
            raise ValueError(f"duty {name!r} declared twice")
        self.duties[name] = Duty(name, run, tier=tier, critical=critical, stop=stop)
        # Exported from the start (at 0), so rate() and absence alerts see every duty.
        self._metrics.duty_up.labels(name).set(0)
        self._metrics.duty_failing.labels(name).set(0)
        self._metrics.duty_crashes.labels(name)

    def start(self) -> None:
        for tier in Tier:
            for duty in self._in(tier):
                duty.state = DutyState.STARTING
                duty.task = asyncio.create_task(self._keep_running(duty), name=duty.name)

    async def stop(
        self, tier: Tier, *, graceful: bool = True, finish_within_s: float = STOP_TIMEOUT_S
    ) -> None:
        """Stop one tier's duties (in reverse of their declaration) and wait for them to end.

        ``graceful``: duties that have a ``stop`` are asked to finish, for up to
        ``finish_within_s``; the others, and those that overrun, are cancelled.
        """
        for duty in reversed(self._in(tier)):
            task, duty.task = duty.task, None
            if task is not None:
                await self._end(duty, task, graceful=graceful, finish_within_s=finish_within_s)
            duty.state = DutyState.STOPPED
            self._metrics.duty_up.labels(duty.name).set(0)
            self._metrics.duty_failing.labels(duty.name).set(0)

    async def _end(
        self, duty: Duty, task: asyncio.Task[None], *, graceful: bool, finish_within_s: float
    ) -> None:
        duty.stopping = True
        if graceful and duty.stop is not None:
            duty.stop()
            done, _ = await asyncio.wait([task], timeout=finish_within_s)
            if done:
                return
            self._log.warning("duty.stop_overran", duty=duty.name, waited_s=finish_within_s)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
        if not done:  # it swallowed the cancellation: say so, and do not hold the drain
            self._log.error("duty.stop_timed_out", duty=duty.name, waited_s=STOP_TIMEOUT_S)

    async def stop_all(self) -> None:
        for tier in reversed(Tier):
            await self.stop(tier)

    @property
    def ready(self) -> bool:
        """False while any duty keeps crashing."""
        return not any(duty.state is DutyState.FAILING for duty in self.duties.values())

    @property
    def critical_ok(self) -> bool:
        """False while a critical duty keeps crashing: the watchdog stops being pinged."""
        return not any(d.critical and d.state is DutyState.FAILING for d in self.duties.values())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: duty.snapshot() for name, duty in self.duties.items()}

    def _in(self, tier: Tier) -> list[Duty]:
        return [duty for duty in self.duties.values() if duty.tier is tier]

    async def _keep_running(self, duty: Duty) -> None:
        this = asyncio.current_task()
        loop = asyncio.get_running_loop()
        while True:
            if duty.state is not DutyState.FAILING:
                duty.state = DutyState.RUNNING
            self._metrics.duty_up.labels(duty.name).set(1)
            stable = loop.call_later(self._policy.stable_after_s, self._ran_stably, duty)
            try:
                await (duty.run() if self._faults is None else self._faults.guard(duty.name, duty.run))
                if duty.stopping:
                    return  # asked to finish, and it did
                error: BaseException = RuntimeError("returned; a duty should run until it is stopped")
            except asyncio.CancelledError as cancelled:
                if this is not None and this.cancelling():
                    raise  # stopped by ``stop``
                error = cancelled  # something inside the duty cancelled it: as much a crash as any
            except Exception as crash:  # anything at all: that is the point of supervising
                error = crash
            finally:
                stable.cancel()
            delay = self._crashed(duty, error)
            if duty.stopping:
                return  # crashed while finishing: logged and counted, not restarted
            await asyncio.sleep(delay)

    def _crashed(self, duty: Duty, error: BaseException) -> float:
        """Log, count and classify a crash; return how long to wait before the restart."""
        self._metrics.duty_up.labels(duty.name).set(0)
        self._metrics.duty_crashes.labels(duty.name).inc()
        duty.crashes += 1
        duty.crashes_in_a_row += 1
        duty.last_error = f"{type(error).__name__}: {error}"[:300]
        delay = self._policy.delay(duty.crashes_in_a_row)
        failing = duty.crashes_in_a_row >= self._policy.failing_after
        self._log.error(
            "duty.crashed",
            duty=duty.name,
            critical=duty.critical,
            crashes_in_a_row=duty.crashes_in_a_row,
            restart_in_s=delay,
            exc_info=error,
        )
        if failing and duty.state is not DutyState.FAILING:
            # Once per streak: the instance stops being ready, and for a critical duty
            # systemd restarts the process when the watchdog goes unpinged.
            self._log.critical(
                "duty.failing",
                duty=duty.name,
                critical=duty.critical,
                watchdog="withheld" if duty.critical else "kept",
            )
            self._metrics.duty_failing.labels(duty.name).set(1)
        duty.state = DutyState.FAILING if failing else DutyState.RESTARTING
        return delay

    def _ran_stably(self, duty: Duty) -> None:
        """A run of ``stable_after_s`` ends a streak of crashes, and a failing duty recovers."""
        if duty.state is DutyState.FAILING:
            self._log.warning("duty.recovered", duty=duty.name, after_crashes=duty.crashes_in_a_row)
            self._metrics.duty_failing.labels(duty.name).set(0)
        duty.state = DutyState.RUNNING
        duty.crashes_in_a_row = 0


class FaultInjector:
    """For tests only: makes a named duty raise, as its own code would, while it runs.

    ``serve`` takes one as an argument; production passes none and every duty
    runs untouched. Tests use it to prove that each duty's crash is logged,
    counted and restarted, where no real fault is cheap to cause.
    """

    def __init__(self) -> None:
        self._pending: defaultdict[str, asyncio.Queue[Exception]] = defaultdict(asyncio.Queue)

    def crash(self, duty: str, error: Exception) -> None:
        self._pending[duty].put_nowait(error)

    async def guard(self, name: str, run: DutyRun) -> None:
        """Run ``run`` until it ends or a fault for ``name`` arrives, which is then raised."""
        work = asyncio.ensure_future(run())
        fault = asyncio.ensure_future(self._pending[name].get())
        try:
            await asyncio.wait([work, fault], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, fault):
                task.cancel()
            await asyncio.gather(work, fault, return_exceptions=True)
        if fault.done() and not fault.cancelled():
            raise fault.result()
        work.result()
