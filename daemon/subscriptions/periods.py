"""Billing periods: interval arithmetic from an anchor, and deterministic spreading of due times.

Period ``c`` of a subscription ends at ``billing_anchor + (c - anchor_cycle)``
intervals. Counting from the anchor instead of adding one interval to the last
end keeps month-end subscriptions on their day: Jan 31, Feb 28, Mar 31, not
Jan 31, Feb 28, Mar 28.
"""

from __future__ import annotations

import calendar
import enum
import hashlib
from datetime import datetime, timedelta


class IntervalUnit(enum.StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


def add_months(moment: datetime, months: int) -> datetime:
    """``moment`` plus ``months`` calendar months, the day clamped to the month's last."""
    index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def add_intervals(moment: datetime, unit: IntervalUnit, count: int) -> datetime:
    """``moment`` plus ``count`` intervals of ``unit`` (``count`` may be negative)."""
    match unit:
        case IntervalUnit.DAY:
            return moment + timedelta(days=count)
        case IntervalUnit.WEEK:
            return moment + timedelta(weeks=count)
        case IntervalUnit.MONTH:
            return add_months(moment, count)
        case IntervalUnit.YEAR:
            return add_months(moment, 12 * count)


def period_end(
    anchor: datetime, anchor_cycle: int, cycle: int, unit: IntervalUnit, interval_count: int
) -> datetime:
    """When billing cycle ``cycle`` ends (and cycle ``cycle + 1`` falls due)."""
    return add_intervals(anchor, unit, (cycle - anchor_cycle) * interval_count)


def spread(subscription_id: int, cycle: int, salt: str, window_s: float) -> timedelta:
    """A stable offset in ``[0, window_s)`` for this subscription and cycle.

    Deterministic, so recomputing a due time (a replayed outcome, a second
    instance) lands on the same instant, and uniform, so subscriptions that
    share a due time (everyone anchored at midnight) spread over the window.
    """
    if window_s <= 0:
        return timedelta(0)
    digest = hashlib.blake2b(f"{salt}:{subscription_id}:{cycle}".encode(), digest_size=8).digest()
    fraction = int.from_bytes(digest, "big") / 2**64
    return timedelta(seconds=fraction * window_s)
