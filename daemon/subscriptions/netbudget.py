"""The card networks' retry limits against a card's recent attempts: may a try go now, or when?

Counted from ``attempts``, across providers, subscriptions and one-off charges:

- a **decline** (``soft_decline``, ``hard_decline``) counts;
- an attempt **still under way** (queued, in flight, unknown) counts as the
  decline it may turn out to be, so a batch that sends many tries on one card
  at once cannot overshoot a limit when they all come back declined;
- an **approval** never counts, and resets nothing;
- an attempt that **never reached the issuer** (``rate_limited``,
  ``provider_error``: a refused connection, a 429, ``cycle_taken``,
  ``not_received``) never counts: a provider outage must not spend a card.

One query per scheduler batch reads the counters of every payment method in
it, from ``ix_attempts_network`` alone; the batch then adds its own
dispatches as it goes. A try that would exceed a limit is deferred to the
moment the oldest counted decline leaves the window (or, when only tries
under way make up the count, ``pending_recheck_s`` later), and looked at again
then: held back, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Final

import msgspec

from daemon.storage.db import Cursor, fetch_all, placeholders
from daemon.subscriptions.model import Subscription
from daemon.subscriptions.networks import WINDOW_30_DAYS_S, Counted, NetworkRule
from daemon.subscriptions.policy import SubscriptionPolicy

# Null-safe, so that a sum over only queued rows (outcome NULL) is 0, not NULL.
_DECLINED: Final = "IFNULL(outcome IN ('soft_decline', 'hard_decline'), 0)"
_PENDING: Final = "(outcome IS NULL OR outcome = 'unknown')"


def _sum(condition: str) -> str:
    """How many rows of the group meet ``condition``, as an integer (SUM alone is a DECIMAL)."""
    return f"CAST(SUM({condition}) AS SIGNED)"


class KeyCounts(msgspec.Struct, kw_only=True):
    """One payment method, amount and currency: its counted attempts (mutable, per batch)."""

    declines_24h: int = 0
    declines_30d: int = 0
    declines_before: int = 0
    """Declines in the 30 days before the window: whether the window's first decline is a reattempt."""
    pending_24h: int = 0
    pending_30d: int = 0
    oldest_24h: datetime | None = None
    oldest_30d: datetime | None = None


class Deferral(msgspec.Struct, frozen=True, kw_only=True):
    """A try held back: by which rule, until when, and the count that made it so."""

    rule: NetworkRule
    retry_at: datetime
    counted: int

    @property
    def reason(self) -> str:
        scope = "for this card, amount and currency" if self.rule.by_amount else "for this card"
        what = "declined reattempts" if self.rule.counts is Counted.DECLINED_REATTEMPTS else "declines"
        window = "30 days" if self.rule.window_s == WINDOW_30_DAYS_S else "24 hours"
        return (
            f"deferred by {self.rule.name}: {self.counted} {what} {scope} in {window} "
            f"(tries under way included), limit {self.rule.limit}"
        )


Key = tuple[str, int, str]


class _CounterRow(msgspec.Struct, array_like=True, frozen=True):
    """One row of the counters query, in its SELECT order (the sums cast to integers: a
    MySQL SUM is a DECIMAL)."""

    payment_method: str
    amount_minor: int
    currency: str
    declines_24h: int
    declines_30d: int
    declines_before: int
    pending_24h: int
    pending_30d: int
    oldest_24h: datetime | None
    oldest_30d: datetime | None


class NetworkCounters:
    """The counters of a set of payment methods at ``now``; ``dispatched`` adds a new try."""

    def __init__(self, now: datetime, counts: dict[Key, KeyCounts]) -> None:
        self.now = now
        self._counts = counts
        self._keys: dict[str, list[Key]] = {}
        for key in counts:
            self._keys.setdefault(key[0], []).append(key)

    @classmethod
    async def load(cls, cursor: Cursor, payment_methods: Iterable[str], *, now: datetime) -> NetworkCounters:
        """Read the counters of these methods: one covering range per method on ``ix_attempts_network``."""
        methods = sorted(set(payment_methods))
        if not methods:
            return cls(now, {})
        day, month = now - timedelta(days=1), now - timedelta(seconds=WINDOW_30_DAYS_S)
        await cursor.execute(
            "SELECT payment_method, amount_minor, currency, "  # noqa: S608 (placeholders only)
            f"{_sum(_DECLINED + ' AND created_at > %s')}, {_sum(_DECLINED + ' AND created_at > %s')}, "
            f"{_sum(_DECLINED + ' AND created_at <= %s')}, "
            f"{_sum(_PENDING + ' AND created_at > %s')}, {_sum(_PENDING + ' AND created_at > %s')}, "
            f"MIN(IF({_DECLINED} AND created_at > %s, created_at, NULL)), "
            f"MIN(IF({_DECLINED} AND created_at > %s, created_at, NULL)) "
            "FROM attempts FORCE INDEX (ix_attempts_network) "
            f"WHERE payment_method IN ({placeholders(len(methods))}) AND created_at > %s "
            f"AND ({_DECLINED} OR {_PENDING}) GROUP BY payment_method, amount_minor, currency",
            [day, month, month, day, month, day, month, *methods, now - 2 * (now - month)],
        )
        counts = {
            (row.payment_method, row.amount_minor, row.currency): KeyCounts(
                declines_24h=row.declines_24h,
                declines_30d=row.declines_30d,
                declines_before=row.declines_before,
                pending_24h=row.pending_24h,
                pending_30d=row.pending_30d,
                oldest_24h=row.oldest_24h,
                oldest_30d=row.oldest_30d,
            )
            for row in await fetch_all(cursor, _CounterRow)
        }
        return cls(now, counts)

    def dispatched(self, payment_method: str, amount_minor: int, currency: str) -> None:
        """A try sent in this batch: under way, so it counts as the decline it may become."""
        key = (payment_method, amount_minor, currency)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = KeyCounts()
            self._keys.setdefault(payment_method, []).append(key)
        counts.pending_24h += 1
        counts.pending_30d += 1

    def check_subscription(self, sub: Subscription, policy: SubscriptionPolicy) -> Deferral | None:
        """May the next try of ``sub`` go now, under the rules of its card's brand?"""
        return self.check(
            sub.payment_method,
            sub.amount_minor,
            sub.currency,
            policy.rules_for(sub.card_brand),
            pending_recheck_s=policy.pending_recheck_s,
        )

    def check(
        self,
        payment_method: str,
        amount_minor: int,
        currency: str,
        rules: Sequence[NetworkRule],
        *,
        pending_recheck_s: float,
    ) -> Deferral | None:
        """None if a try may go now; else the rule that holds it back the longest."""
        deferrals = [
            deferral
            for rule in rules
            if (deferral := self._check(rule, payment_method, amount_minor, currency, pending_recheck_s))
        ]
        return max(deferrals, key=lambda d: d.retry_at, default=None)

    def _check(
        self, rule: NetworkRule, method: str, amount: int, currency: str, pending_recheck_s: float
    ) -> Deferral | None:
        daily = rule.window_s < WINDOW_30_DAYS_S
        keys = [(method, amount, currency)] if rule.by_amount else self._keys.get(method, [])
        rows = [self._counts[k] for k in keys if k in self._counts]
        declines = sum(r.declines_24h if daily else r.declines_30d for r in rows)
        pending = sum(r.pending_24h if daily else r.pending_30d for r in rows)
        oldest = min((o for r in rows if (o := r.oldest_24h if daily else r.oldest_30d)), default=None)
        if rule.counts is Counted.DECLINED_REATTEMPTS:
            before = sum(r.declines_before for r in rows)
            if declines + pending + before == 0:
                return None  # nothing declined: the try is not a reattempt
            # The window's first decline is the declined transaction itself, unless an
            # earlier decline makes it a reattempt too.
            first = 0 if before else 1
            counted = max(0, declines + pending - first)
            settled = max(0, declines - first)
        else:
            counted, settled = declines + pending, declines
        if counted < rule.limit:
            return None
        if settled >= rule.limit and oldest is not None:
            retry_at = oldest + timedelta(seconds=rule.window_s)
        else:
            # Tries under way make up the count: they settle, and approvals stop counting.
            retry_at = self.now + timedelta(seconds=pending_recheck_s)
        return Deferral(rule=rule, retry_at=max(retry_at, self.now), counted=counted)
