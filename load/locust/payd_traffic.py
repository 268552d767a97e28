"""What the load test sends, and how it turns payd's events into locust requests.

Each published attempt is remembered with the moment its publish started.
When its first ``payment.*`` event arrives, the tracker reports one locust
request: type ``attempt``, named by the outcome, timed publish -> event. A
declined charge is payd working and counts as a success; ``payment.failed``
and ``payment.unknown`` count as failures, and so does an attempt with no
event within the timeout (named ``timeout``).
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FAILED_TYPES = frozenset({"payment.failed", "payment.unknown"})
KEY_PREFIX = "locust"


class AttemptFailed(Exception):
    """payd ended the attempt failed or unknown; the message names type, outcome and code."""


class AttemptTimedOut(Exception):
    """No payment event arrived for the attempt within the timeout."""


@dataclass(frozen=True)
class TokenMix:
    """Payment method tokens with weights, e.g. ``pm_ok=90,pm_insufficient_funds=6,pm_stolen=4``."""

    tokens: tuple[str, ...]
    cumulative: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> TokenMix:
        tokens: list[str] = []
        weights: list[float] = []
        for entry in text.split(","):
            part = entry.strip()
            if not part:
                continue
            token, _, weight = part.replace(":", "=").partition("=")
            value = float(weight) if weight else 1.0
            if not token or value <= 0:
                raise ValueError(f"token mix entry {part!r}: want TOKEN or TOKEN=WEIGHT with WEIGHT > 0")
            tokens.append(token.strip())
            weights.append(value)
        if not tokens:
            raise ValueError("the token mix is empty")
        return cls(tuple(tokens), tuple(itertools.accumulate(weights)))

    def pick(self, rng: random.Random) -> str:
        return self.tokens[bisect.bisect_right(self.cumulative, rng.random() * self.cumulative[-1])]


class AttemptFactory:
    """Builds attempt requests with idempotency keys unique to this process's run."""

    def __init__(
        self,
        *,
        provider: str,
        tokens: TokenMix,
        currency: str = "EUR",
        renewal_share: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.run_id = secrets.token_hex(4)
        self.prefix = f"{KEY_PREFIX}-{self.run_id}-"
        self._provider = provider
        self._tokens = tokens
        self._currency = currency
        self._renewal_share = renewal_share
        self._rng = rng or random.Random()
        self._sequence = itertools.count(1)
        # Subscription ids for renewals: a random block per run, so runs do not collide
        # on (subscription, cycle), which payd would rightly refuse as cycle_taken.
        self._subscription_base = self._rng.randrange(10**12, 9 * 10**12)

    def next(self) -> tuple[str, str, bytes]:
        """(idempotency key, token, JSON body) of a new attempt request."""
        number = next(self._sequence)
        key = f"{self.prefix}{number}"
        token = self._tokens.pick(self._rng)
        request: dict[str, Any] = {
            "idempotency_key": key,
            "amount_minor": self._rng.randrange(99, 10_000),
            "currency": self._currency,
            "provider": self._provider,
            "payment_method": token,
            "metadata": {"source": "locust", "run": self.run_id},
        }
        if self._renewal_share and self._rng.random() < self._renewal_share:
            request["subscription_id"] = self._subscription_base + number
            request["cycle"] = 1
        return key, token, json.dumps(request).encode()


@dataclass
class Pending:
    started: float  # time.perf_counter() when the publish started
    token: str


ReportRequest = Callable[..., None]
"""``environment.events.request.fire``, called with locust's request keywords."""


class AttemptTracker:
    """Matches payment events to the attempts this process published."""

    def __init__(self, report: ReportRequest, *, prefix: str, timeout_s: float) -> None:
        self._report = report
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._pending: dict[str, Pending] = {}
        # Events that beat their publisher's confirm back: (event, size, arrival).
        self._early: dict[str, tuple[dict[str, Any], int, float]] = {}
        self.completed = 0
        self.failed = 0
        self.timed_out = 0
        self.late = 0

    def __len__(self) -> int:
        return len(self._pending)

    def published(self, key: str, token: str, started: float) -> None:
        """The broker confirmed ``key``; from now on its first event completes it."""
        early = self._early.pop(key, None)
        self._pending[key] = Pending(started, token)
        if early is not None:
            event, size, arrived = early
            self._complete(key, event, size, arrived)

    def on_event(self, event: dict[str, Any], size: int) -> None:
        key = event.get("idempotency_key")
        if not isinstance(key, str) or not key.startswith(self._prefix):
            return  # someone else's traffic, or another locust process's
        if key in self._pending:
            self._complete(key, event, size, time.perf_counter())
        elif key not in self._early:
            # Either its confirm is still on the way, or a second event (unknown, then
            # its reconciled outcome) for an attempt already reported.
            self._early[key] = (event, size, time.perf_counter())

    def _complete(self, key: str, event: dict[str, Any], size: int, arrived: float) -> None:
        pending = self._pending.pop(key)
        kind = str(event.get("type", "payment.?"))
        outcome = str(event.get("outcome") or kind.removeprefix("payment."))
        exception: Exception | None = None
        if kind in FAILED_TYPES:
            self.failed += 1
            exception = AttemptFailed(f"{kind} outcome={outcome} decline_code={event.get('decline_code')}")
        else:
            self.completed += 1
        self._report(
            request_type="attempt",
            name=outcome,
            response_time=(arrived - pending.started) * 1000,
            response_length=size,
            exception=exception,
            context={"token": pending.token, "idempotency_key": key},
        )

    def expire(self, now: float | None = None, *, everything: bool = False) -> int:
        """Report attempts waiting longer than the timeout (or all of them) as ``timeout``."""
        now = time.perf_counter() if now is None else now
        expired = [
            key
            for key, pending in self._pending.items()
            if everything or now - pending.started >= self._timeout_s
        ]
        for key in expired:
            pending = self._pending.pop(key)
            self.timed_out += 1
            self._report(
                request_type="attempt",
                name="timeout",
                response_time=(now - pending.started) * 1000,
                response_length=0,
                exception=AttemptTimedOut(f"no payment event within {self._timeout_s:g} s"),
                context={"token": pending.token, "idempotency_key": key},
            )
        # Early events nobody claimed within the timeout belong to publishes that failed
        # or were cut short, or are second events: forget them.
        stale = [k for k, (_, _, arrived) in self._early.items() if now - arrived >= self._timeout_s]
        for key in stale:
            del self._early[key]
            self.late += 1
        return len(expired)
