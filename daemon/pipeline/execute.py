"""Execute: one attempt's provider call(s), bounded by the provider's limiter.

Retries happen here only for answers that charged nothing (rate limited,
provider error), with the same idempotency key. An unknown answer is never
retried: it goes to reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec

from daemon.config import ProviderConfig
from daemon.metrics import Metrics
from daemon.models import CHARGED_NOTHING, AttemptRequest, ChargeResult, Outcome
from daemon.pipeline.limiter import ProviderLimiter
from daemon.providers.base import Provider


class Lane(msgspec.Struct, kw_only=True):
    """Everything payd holds for one configured provider."""

    name: str
    provider: Provider
    config: ProviderConfig
    limiter: ProviderLimiter


class AttemptRun:
    """The mutable progress of one attempt, read by drain to decide its fate."""

    __slots__ = ("calling", "request", "started", "tries")

    def __init__(self, request: AttemptRequest) -> None:
        self.request = request
        self.calling = False
        """True while a request may be on its way to the provider."""
        self.tries = 0
        self.started = time.monotonic()


async def execute(
    lane: Lane,
    run: AttemptRun,
    *,
    lease_deadline: float,
    stopping: asyncio.Event,
    metrics: Metrics,
) -> ChargeResult | None:
    """The attempt's final result, or None if it was never sent and should go back to the queue."""
    config = lane.config
    call_seconds = metrics.provider_call_seconds.labels(lane.name)
    in_flight = metrics.in_flight.labels(lane.name)
    while True:
        if not await lane.limiter.acquire():
            return None
        if time.monotonic() + config.timeout_s >= lease_deadline:
            # Too late to start a call that could outlive our claim.
            lane.limiter.release()
            return None
        run.tries += 1
        run.calling = True
        in_flight.inc()
        started = time.monotonic()
        try:
            # The adapter's HTTP timeout should fire first; this guards a misbehaving adapter.
            async with asyncio.timeout(config.timeout_s + config.connect_timeout_s + 1):
                result = await lane.provider.charge(run.request)
        except TimeoutError:
            result = ChargeResult(outcome=Outcome.UNKNOWN, reason="adapter overran its timeout")
        except Exception as error:
            # It may have failed after sending: only a lookup can say.
            result = ChargeResult(outcome=Outcome.UNKNOWN, reason=f"adapter raised {type(error).__name__}")
        finally:
            lane.limiter.release()
            in_flight.dec()
            call_seconds.observe(time.monotonic() - started)
        if result.outcome not in CHARGED_NOTHING:
            return result
        run.calling = False
        if not result.retryable or run.tries >= config.max_tries:
            return result
        wait = result.retry_after_s or config.retry_backoff_s * 2 ** (run.tries - 1)
        if time.monotonic() + wait + config.timeout_s >= lease_deadline:
            return result
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), wait)
        if stopping.is_set():
            return None  # nothing was charged: the queue keeps it for another instance
