"""``payd attempts list``: attempts in one state, by provider and age, oldest first."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import aiomysql
import msgspec

from daemon.models import AttemptState
from daemon.storage.db import transaction

_DURATION: Final = re.compile(r"(\d+)([smhdw])")
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """``15m``, ``2h``, ``3d``, ``1h30m`` -> seconds. Raises ValueError on anything else."""
    compact = text.strip().lower()
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 3d, 1w, 1h30m)")
    return sum(int(number) * _SECONDS[unit] for number, unit in parts)


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


class AttemptList(msgspec.Struct, frozen=True, kw_only=True):
    attempts: list[AttemptLine]
    truncated: bool
    """More attempts match than ``limit`` allowed to show."""


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
    for row in rows:
        row["created_at"] = row["created_at"].replace(tzinfo=UTC)
    lines = [msgspec.convert(row, AttemptLine) for row in rows[: wanted.limit]]
    return AttemptList(attempts=lines, truncated=len(rows) > wanted.limit)


def short_age(seconds: int) -> str:
    """``90`` -> ``1m``, ``7200`` -> ``2h``: ages in a column."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render_list(found: AttemptList, wanted: AttemptFilter, out: TextIO) -> None:
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
