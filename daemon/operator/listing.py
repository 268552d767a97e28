"""``payd attempts list``: attempts in one state, by provider and age, oldest first; the refunds in
that state after them, marked as refunds (``unknown`` lists pending refunds too)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final, Literal, TextIO

import aiomysql
import msgspec

from daemon.models import AttemptState
from daemon.storage.db import Cursor, fetch_all, placeholders, transaction

_DURATION: Final = re.compile(r"(\d+)([smhdw])")
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """``15m``, ``2h``, ``3d``, ``1h30m`` -> seconds. Raises ValueError on anything else."""
    compact = text.strip().lower()
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 3d, 1w, 1h30m)")
    return sum(int(number) * _SECONDS[unit] for number, unit in parts)


MAX_LIMIT: Final = 1000
"""The most attempts (and as many refunds) one listing loads; a larger limit is lowered to it
(the listing says ``truncated`` when more match)."""


def checked_limit(limit: int) -> int:
    """A listing's limit: at least 1 (ValueError naming it otherwise), at most ``MAX_LIMIT``."""
    if limit < 1:
        raise ValueError(f"limit {limit}: at least 1 (at most {MAX_LIMIT})")
    return min(limit, MAX_LIMIT)


class AttemptFilter(msgspec.Struct, frozen=True, kw_only=True):
    state: AttemptState = AttemptState.UNKNOWN
    provider: str | None = None
    """Matches the requested provider or the one a failover routed it to."""
    older_than_s: int | None = None
    """Created at least this long ago."""
    limit: int = 100


class AttemptLine(msgspec.Struct, frozen=True, kw_only=True):
    idempotency_key: str
    state: AttemptState
    provider: str
    routed_provider: str | None
    amount_minor: int
    currency: str
    subscription_id: int | None
    cycle: int | None
    provider_calls: int
    reconcile_lookups: int
    reason: str | None
    created_at: datetime
    age_s: int


class RefundLine(msgspec.Struct, frozen=True, kw_only=True):
    """A refund in the listed state (for ``unknown``: unknown and pending ones), beside the charges."""

    kind: Literal["refund"] = "refund"
    idempotency_key: str
    original_idempotency_key: str
    state: str
    provider: str | None
    amount_minor: int
    currency: str | None
    subscription_id: int | None
    cycle: int | None
    provider_calls: int
    reconcile_lookups: int
    parked: bool
    """Unknown and out of automatic reconciliation (its lookup raised): ``payd attempts unpark``."""
    reason: str | None
    created_at: datetime
    age_s: int


class AttemptList(msgspec.Struct, frozen=True, kw_only=True):
    attempts: list[AttemptLine]
    truncated: bool
    """More attempts match than ``limit`` allowed to show."""
    refunds: list[RefundLine] = msgspec.field(default_factory=list)
    """Refunds in the same state, by the same filters and ``limit``."""
    refunds_truncated: bool = False


class _RefundRow(msgspec.Struct, array_like=True, frozen=True):
    idempotency_key: str
    original_idempotency_key: str
    state: str
    provider: str | None
    amount_minor: int
    currency: str | None
    subscription_id: int | None
    cycle: int | None
    provider_calls: int
    reconcile_lookups: int
    parked: int
    reason: str | None
    created_at: datetime
    age_s: int


def _refund_states(state: AttemptState) -> tuple[str, ...]:
    """The reversal states listed with ``state``: an unknown list shows pending refunds too
    (their outcome is not known yet either)."""
    if state is AttemptState.UNKNOWN:
        return ("unknown", "pending")
    return (state.value,)


async def _list_refunds(cursor: Cursor, wanted: AttemptFilter) -> tuple[list[RefundLine], bool]:
    states = _refund_states(wanted.state)
    conditions = [f"r.state IN ({placeholders(len(states))})"]
    args: list[Any] = list(states)
    if wanted.provider is not None:
        conditions.append("r.provider = %s")
        args.append(wanted.provider)
    if wanted.older_than_s is not None:
        conditions.append("r.created_at <= NOW(6) - INTERVAL %s SECOND")
        args.append(wanted.older_than_s)
    await cursor.execute(
        "SELECT r.idempotency_key, r.original_idempotency_key, r.state, r.provider, r.amount_minor, "  # noqa: S608
        "r.currency, a.subscription_id, a.cycle, r.tries, r.reconcile_tries, "
        "r.state = 'unknown' AND r.recheck_at IS NULL, r.result_reason, r.created_at, "
        "TIMESTAMPDIFF(SECOND, r.created_at, NOW(6)) FROM reversals r "
        "LEFT JOIN attempts a ON a.id = r.original_attempt_id "
        f"WHERE {' AND '.join(conditions)} ORDER BY r.id LIMIT %s",
        [*args, wanted.limit + 1],
    )
    rows = await fetch_all(cursor, _RefundRow)
    lines = [
        RefundLine(
            **{
                **msgspec.structs.asdict(row),
                "parked": row.parked == 1,
                "created_at": row.created_at.replace(tzinfo=UTC),
            }
        )
        for row in rows[: wanted.limit]
    ]
    return lines, len(rows) > wanted.limit


async def list_attempts(pool: aiomysql.Pool, wanted: AttemptFilter) -> AttemptList:
    conditions, args = ["state = %s"], list[Any]([wanted.state.value])
    if wanted.provider is not None:
        conditions.append("(provider = %s OR routed_provider = %s)")
        args += [wanted.provider, wanted.provider]
    if wanted.older_than_s is not None:
        conditions.append("created_at <= NOW(6) - INTERVAL %s SECOND")
        args.append(wanted.older_than_s)
    async with transaction(pool) as cursor:
        await cursor.execute(
            "SELECT idempotency_key, state, provider, routed_provider, amount_minor, currency, "  # noqa: S608
            "subscription_id, cycle, tries AS provider_calls, reconcile_tries AS reconcile_lookups, reason, "
            "created_at, TIMESTAMPDIFF(SECOND, created_at, NOW(6)) AS age_s FROM attempts "
            f"WHERE {' AND '.join(conditions)} ORDER BY id LIMIT %s",
            [*args, wanted.limit + 1],
        )
        names = [column[0] for column in cursor.description]
        rows: list[dict[str, Any]] = [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]
        refunds, refunds_truncated = await _list_refunds(cursor, wanted)
    for row in rows:
        row["created_at"] = row["created_at"].replace(tzinfo=UTC)
    lines = [msgspec.convert(row, AttemptLine) for row in rows[: wanted.limit]]
    return AttemptList(
        attempts=lines,
        truncated=len(rows) > wanted.limit,
        refunds=refunds,
        refunds_truncated=refunds_truncated,
    )


def short_age(seconds: int) -> str:
    """``90`` -> ``1m``, ``7200`` -> ``2h``: ages in a column."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render_list(found: AttemptList, wanted: AttemptFilter, out: TextIO) -> None:
    _render_attempts(found, wanted, out)
    _render_refunds(found, wanted, out)


def _render_refunds(found: AttemptList, wanted: AttemptFilter, out: TextIO) -> None:
    if not found.refunds:
        return
    width = max(len(line.idempotency_key) for line in found.refunds)
    print(
        f"{'refund':<{width}} {'of charge':<24} {'state':<8} {'provider':<12} {'amount':>14} {'age':>5} "
        f"{'calls':>5} {'lookups':>7}  reason",
        file=out,
    )
    for line in found.refunds:
        amount = f"{line.amount_minor} {line.currency or '-'}"
        state = "parked" if line.parked else line.state
        print(
            f"{line.idempotency_key:<{width}} {line.original_idempotency_key:<24} {state:<8} "
            f"{line.provider or '-':<12} {amount:>14} {short_age(line.age_s):>5} {line.provider_calls:>5} "
            f"{line.reconcile_lookups:>7}  {line.reason or '-'}",
            file=out,
        )
    more = f"; more match, raise --limit (now {wanted.limit})" if found.refunds_truncated else ""
    print(f"{len(found.refunds)} {'/'.join(_refund_states(wanted.state))} refunds{more}", file=out)


def _render_attempts(found: AttemptList, wanted: AttemptFilter, out: TextIO) -> None:
    if not found.attempts:
        print(f"no {wanted.state.value} attempts match", file=out)
        return
    width = max(len(line.idempotency_key) for line in found.attempts)
    print(
        f"{'key':<{width}} {'provider':<12} {'amount':>14} {'subscription':<14} {'age':>5} "
        f"{'calls':>5} {'lookups':>7}  reason",
        file=out,
    )
    for line in found.attempts:
        provider = line.routed_provider or line.provider
        subscription = f"{line.subscription_id}:{line.cycle}" if line.subscription_id else "-"
        amount = f"{line.amount_minor} {line.currency}"
        print(
            f"{line.idempotency_key:<{width}} {provider:<12} {amount:>14} {subscription:<14} "
            f"{short_age(line.age_s):>5} {line.provider_calls:>5} {line.reconcile_lookups:>7}  "
            f"{line.reason or '-'}",
            file=out,
        )
    more = f"; more match, raise --limit (now {wanted.limit})" if found.truncated else ""
    print(f"{len(found.attempts)} {wanted.state.value} attempts{more}", file=out)
