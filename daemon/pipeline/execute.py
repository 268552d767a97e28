"""Execute: one attempt's provider call(s), bounded by the provider's limiter.

Retries happen here only for answers that charged nothing (rate limited,
provider error), with the same idempotency key. An unknown answer is never
retried: it goes to reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import msgspec

from daemon.config import ProviderConfig
from daemon.halt import HaltState
from daemon.metrics import Metrics
from daemon.models import CHARGED_NOTHING, AttemptRequest, ChargeResult, Outcome
from daemon.pipeline.breaker import CircuitBreaker
from daemon.pipeline.limiter import ProviderLimiter
from daemon.pipeline.ratelimit import RateLimit, Unlimited
from daemon.providers.base import Provider

T = TypeVar("T")


class Lane(msgspec.Struct, kw_only=True):
    """Everything payd holds for one configured provider, and the protections around it."""

    name: str
    provider: Provider
    config: ProviderConfig
    limiter: ProviderLimiter
    breaker: CircuitBreaker
    rate: RateLimit = msgspec.field(default_factory=Unlimited)
    halt: HaltState
    """The fleet-wide emergency stop, shared by every lane."""
    paused_until: float = 0.0
    """Set by a 429: no call to this provider starts before then (monotonic clock)."""

    def may_call(self) -> bool:
        return not self.halt.blocks(self.name)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


def breaker_for(config: ProviderConfig) -> CircuitBreaker:
    return CircuitBreaker(
        failure_ratio=config.breaker_failure_ratio,
        min_calls=config.breaker_min_calls,
        window_s=config.breaker_window_s,
        open_s=config.breaker_open_s,
        max_open_s=config.breaker_max_open_s,
        probes=config.breaker_probes,
    )


class AttemptRun:
    """The mutable progress of one attempt, read by drain to decide its fate."""

    __slots__ = ("calling", "provider", "rate_limited", "request", "started", "tries")

    def __init__(self, request: AttemptRequest) -> None:
        self.request = request
        self.provider = request.provider
        """The connection actually used: the requested one, or its failover."""
        self.calling = False
        """True while a request may be on its way to the provider."""
        self.tries = 0
        self.rate_limited = 0
        self.started = time.monotonic()

    def call(self, provider: Provider) -> Awaitable[ChargeResult]:
        """The provider call this run makes: a charge (a reversal's run sends a refund)."""
        return provider.charge(self.request)


BREAKER_OPEN: Final = ChargeResult(
    outcome=Outcome.PROVIDER_ERROR, reached_provider=False, reason="breaker open: not sent"
)


class _Gate(enum.Enum):
    GO = "go"
    GIVE_BACK = "give back"
    BREAKER_OPEN = "breaker open"


async def _wait_for_gate(
    lane: Lane, *, lease_deadline: float, stopping: asyncio.Event, leave_if_open: bool
) -> _Gate:
    """Wait while the fleet is halted, the lane paused (429) or its breaker open.

    GIVE_BACK: the attempt goes back to the queue (drain, or its claim would run
    out first). BREAKER_OPEN: only with ``leave_if_open``, for a lane that can
    fail over rather than wait.
    """
    while True:
        if stopping.is_set():
            return _Gate.GIVE_BACK
        now = time.monotonic()
        if now + lane.config.timeout_s >= lease_deadline:
            return _Gate.GIVE_BACK
        if not lane.may_call():
            await lane.halt.wait_for_change(at_most_s=min(1.0, lease_deadline - now - lane.config.timeout_s))
            continue
        if now < lane.paused_until:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), lane.paused_until - now)
            continue
        if lane.breaker.try_enter():
            return _Gate.GO
        if leave_if_open:
            return _Gate.BREAKER_OPEN
        await lane.breaker.wait(at_most_s=lease_deadline - now - lane.config.timeout_s)


async def _call_provider(lane: Lane, run: AttemptRun, metrics: Metrics) -> ChargeResult:
    """One call, holding a limiter slot the caller acquired; released (or held) here."""
    config = lane.config
    bound = metrics.provider(lane.name)
    in_flight = bound.in_flight
    in_flight.inc()
    started = time.monotonic()
    if run.tries == 1:
        # Halt, 429 pause, breaker, rate limit and limiter together: how long the first call
        # waited for its turn (later tries wait for backoffs, which are chosen, not suffered).
        bound.wait_seconds.observe(started - run.started)
    result: ChargeResult | None = None
    try:
        # The adapter's HTTP timeout should fire first; this guards a misbehaving adapter.
        async with asyncio.timeout(config.timeout_s + config.connect_timeout_s + 1):
            result = await run.call(lane.provider)
            return result
    except TimeoutError:
        result = ChargeResult(outcome=Outcome.UNKNOWN, reason="adapter overran its timeout")
        return result
    except Exception as error:  # an adapter bug must not crash the attempt
        # It may have failed after sending: only a lookup can say.
        result = ChargeResult(outcome=Outcome.UNKNOWN, reason=f"adapter raised {type(error).__name__}")
        return result
    finally:
        # Cancelled (result None) or unknown: the provider may still be working on it. An
        # accepted answer (the provider took it and decides later) is an answer: the slot is free.
        free_slot(lane, metrics, abandoned=result is None or unanswered(result))
        in_flight.dec()
        bound.call_seconds.observe(time.monotonic() - started)


def unanswered(result: ChargeResult) -> bool:
    """Whether payd gave up on the call without the provider's word: unknown, and not accepted
    (an accepted one reached the provider, which decides it later, off this connection)."""
    return result.outcome is Outcome.UNKNOWN and not result.accepted


def free_slot(lane: Lane, metrics: Metrics, *, abandoned: bool) -> None:
    """Release the call's limiter slot, or hold it for ``slot_hold_s`` when payd gave up on a
    call the provider may still be running, so the provider never sees more than the limit."""
    if not abandoned or lane.config.slot_hold_s <= 0:
        lane.limiter.release()
        return
    held = metrics.slots_held.labels(lane.name)
    held.inc()
    lane.limiter.hold(lane.config.slot_hold_s, on_release=held.dec)


async def bounded_call(
    lane: Lane, metrics: Metrics, call: Callable[[], Awaitable[T]], *, may_charge: bool = False
) -> T | None:
    """One reconciliation call (a lookup or a re-send) inside the lane's in-flight limit; None if
    it may not be made now or did not answer in time (asked again after the backoff).

    The halt is checked again once a slot is granted, as ``execute`` does: a halt (or an
    unknown halt state) that began while we waited wins over a call not yet made. A
    ``may_charge`` call (a re-send of a charge or a refund) that ends unsettled keeps its slot
    for ``slot_hold_s``: the provider may still be working on it (invariant 4).
    """
    if not lane.may_call() or not await lane.limiter.acquire():
        return None
    if not lane.may_call():
        lane.limiter.release()
        return None
    config = lane.config
    answered: T | None = None
    try:
        # The adapter's HTTP timeout should fire first; this guards a misbehaving adapter.
        async with asyncio.timeout(config.timeout_s + config.connect_timeout_s + 1):
            answered = await call()
            return answered
    except TimeoutError:
        return None
    finally:
        unsettled = answered is None or (isinstance(answered, ChargeResult) and unanswered(answered))
        free_slot(lane, metrics, abandoned=may_charge and unsettled)


async def execute(
    lane: Lane,
    run: AttemptRun,
    *,
    lease_deadline: float,
    stopping: asyncio.Event,
    metrics: Metrics,
    leave_if_open: bool = False,
) -> ChargeResult | None:
    """The attempt's final result, or None if it was never sent and should go back to the queue.

    With ``leave_if_open`` an open breaker returns ``BREAKER_OPEN`` (nothing
    sent) instead of waiting, so the caller can fail over.
    """
    config = lane.config
    while True:
        # The breaker slot is taken before the limiter's, and given back with the verdict.
        gate = await _wait_for_gate(
            lane, lease_deadline=lease_deadline, stopping=stopping, leave_if_open=leave_if_open
        )
        if gate is _Gate.BREAKER_OPEN:
            return BREAKER_OPEN
        if gate is _Gate.GIVE_BACK:
            return None
        await lane.rate.take()
        if not await lane.limiter.acquire():
            lane.breaker.record_abandoned()
            return None
        if time.monotonic() + config.timeout_s >= lease_deadline:
            # Too late to start a call that could outlive our claim.
            lane.limiter.release()
            lane.breaker.record_abandoned()
            return None
        if not lane.may_call():
            # Halted while we waited for a slot: the halt wins over a call not yet made.
            lane.limiter.release()
            lane.breaker.record_abandoned()
            continue
        run.tries += 1
        run.calling = True
        result = await _call_provider(lane, run, metrics)
        # An accepted answer (Adyen's "received", Checkout.com's 202) is a healthy provider.
        lane.breaker.record(Outcome.APPROVED if result.accepted else result.outcome)
        if result.outcome not in CHARGED_NOTHING:
            return result
        run.calling = False
        if result.outcome is Outcome.RATE_LIMITED:
            # The provider is over its quota for everyone: pause the whole lane, not just us.
            run.rate_limited += 1
            metrics.rate_limited.labels(lane.name).inc()
            lane.pause(result.retry_after_s or config.retry_backoff_s)
            if run.rate_limited >= config.max_rate_limited_tries:
                return result
            continue
        if not result.retryable or run.tries - run.rate_limited >= config.max_tries:
            return result
        wait = config.retry_backoff_s * 2 ** (run.tries - 1)
        if time.monotonic() + wait + config.timeout_s >= lease_deadline:
            return result
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), wait)
        if stopping.is_set():
            return None  # nothing was charged: the queue keeps it for another instance
