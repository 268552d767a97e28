"""``payd rollback``: which succeeded charges a bulk rollback reverses, and what came of it.

A selection is one query on ``attempts`` (``state = 'succeeded'`` plus the
operator's filters; ``ix_attempts_finished`` serves a time window, the unique
key a list of keys), with what each charge already has reserved against it
(invariant 7: queued, in-flight, unknown, pending and succeeded reversals)
summed through ``ix_reversals_original``. A dry run aggregates it in the
database: nothing crosses the wire per charge.

A real run freezes its selection into ``rollback_items`` in one statement and
one commit (a run killed while freezing left nothing), each item with its
deterministic refund key ``rollback:RUN:KEY`` and the amount that remained.
Publishing (``rollback_run.py``) works from those rows; the report joins them
to ``reversals`` by refund key, so it is true whatever state the run was left
in, and ``--report RUN`` prints it again later.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from daemon.storage.db import Cursor, fetch_all, placeholders

RUN_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")
KEY: Final = re.compile(r"^[A-Za-z0-9:_-]{1,128}\Z")
_MAX_KEY: Final = 128
KEYS_PER_QUERY: Final = 1000
"""Keys named in one ``IN (...)``: a long list is queried in chunks, the sums added."""

# Every state whose amount counts against the charge (invariant 7); 'pending' since migration 0012.
RESERVING: Final = ("pending", "queued", "in_flight", "succeeded", "unknown")
_RESERVED: Final = (
    "COALESCE((SELECT SUM(r.amount_minor) FROM reversals r WHERE r.original_attempt_id = a.id "  # noqa: S608
    f"AND r.state IN ({placeholders(len(RESERVING))})), 0)"
)
_CALLED_PROVIDER: Final = "COALESCE(a.routed_provider, a.provider)"


class RollbackError(Exception):
    """A selection or run the command refuses (exit 2 for usage, 1 otherwise), with the reason."""


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    """The operator's filters. At least one is required: never every charge by accident."""

    provider: str | None = None
    """The connection that took the money (a failover's, when there was one)."""
    since: datetime | None = None
    """Completed at or after (UTC)."""
    until: datetime | None = None
    """Completed before (UTC)."""
    plan: str | None = None
    amount_min: int | None = None
    amount_max: int | None = None
    currency: str | None = None
    keys: tuple[str, ...] = ()

    def empty(self) -> bool:
        return self == Selection()

    def recorded(self) -> dict[str, Any]:
        """What a run stores of its selection: a key list by its count and digest."""
        stored = {name: value for name, value in msgspec.to_builtins(self).items() if value not in (None, [])}
        stored.pop("keys", None)
        if self.keys:
            keys = sorted(set(self.keys))  # the same keys in another order are the same selection
            stored["keys_count"] = len(keys)
            stored["keys_sha256"] = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        return stored

    def describe(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.recorded().items()) or "nothing"


def check_names(run: str | None, currency: str | None, rate_per_s: float) -> None:
    """The run's name (it goes into every refund key), the currency and the pace, checked."""
    if run is not None and not RUN_NAME.match(run):
        raise RollbackError(f"run name {run!r}: 1 to 32 of A-Za-z0-9_-")
    if currency is not None and not re.match(r"^[A-Z]{3}\Z", currency):
        raise RollbackError(f"--currency {currency!r}: an ISO 4217 code in upper case, e.g. EUR")
    if not rate_per_s > 0:
        raise RollbackError(f"--rate {rate_per_s}: refunds a second, more than 0")


def parse_amount(text: str) -> tuple[int, int]:
    """``N`` (exactly) or ``MIN..MAX`` (inclusive; one side may be left open, not both), each
    0 or more, MIN at most MAX."""
    low, dots, high = text.strip().partition("..")
    try:
        if not dots:
            low = high = text
        elif not low.strip() and not high.strip():
            raise RollbackError(f"--amount-minor {text!r}: give MIN, MAX or both (.. alone selects nothing)")
        least, most = (int(low) if low.strip() else 0), (int(high) if high.strip() else 10**15)
    except ValueError:
        raise RollbackError(f"--amount-minor {text!r}: expected N or MIN..MAX in the minor unit") from None
    if least < 0 or most < 0:
        raise RollbackError(f"--amount-minor {text!r}: amounts are 0 or more")
    if least > most:
        raise RollbackError(f"--amount-minor {text!r}: MIN is more than MAX")
    return least, most


def parse_moment(flag: str, text: str) -> datetime:
    """An ISO 8601 date or date-time; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise RollbackError(f"{flag} {text!r}: expected an ISO 8601 date or date-time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def read_keys(lines: Iterable[str], source: str) -> list[str]:
    """Charge keys, one a line; blank lines and ``#`` comments skipped; a bad key names its line."""
    keys = []
    for number, line in enumerate(lines, start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not KEY.match(key):
            raise RollbackError(f"{source}:{number}: {key[:60]!r} is not an idempotency key (A-Za-z0-9:_-)")
        keys.append(key)
    return keys


def refund_key(run: str, charge_key: str) -> str:
    """``rollback:RUN:KEY``; a charge key too long for that is replaced by its digest.

    ``_REFUND_KEY_SQL`` computes the same in the database."""
    prefix = f"rollback:{run}:"
    if len(prefix) + len(charge_key) <= _MAX_KEY:
        return prefix + charge_key
    return prefix + hashlib.sha256(charge_key.encode()).hexdigest()[:40]


_REFUND_KEY_SQL: Final = (
    "IF(CHAR_LENGTH(a.idempotency_key) <= %s, CONVERT(CONCAT(%s, a.idempotency_key) USING ascii), "
    "CONVERT(CONCAT(%s, LEFT(SHA2(a.idempotency_key, 256), 40)) USING ascii))"
)


def _naive_utc(moment: datetime) -> datetime:
    """The database's DATETIME columns hold UTC (the session's time zone is +00:00)."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def chunks(selection: Selection) -> list[tuple[str, ...]]:
    """The key lists to query one by one (one empty chunk when the selection names no keys)."""
    keys = sorted(set(selection.keys))
    return [tuple(keys[i : i + KEYS_PER_QUERY]) for i in range(0, len(keys), KEYS_PER_QUERY)] or [()]


def where(selection: Selection, keys: Sequence[str]) -> tuple[str, list[Any]]:
    """The WHERE clause (on ``attempts a``) of one chunk of the selection, and its arguments."""
    clauses: list[str] = ["a.state = 'succeeded'"]
    args: list[Any] = []
    if selection.since is not None:
        clauses.append("a.finished_at >= %s")
        args.append(_naive_utc(selection.since))
    if selection.until is not None:
        clauses.append("a.finished_at < %s")
        args.append(_naive_utc(selection.until))
    if selection.provider is not None:
        clauses.append(f"{_CALLED_PROVIDER} = %s")
        args.append(selection.provider)
    if selection.currency is not None:
        clauses.append("a.currency = %s")
        args.append(selection.currency)
    if selection.amount_min is not None:
        clauses.append("a.amount_minor >= %s")
        args.append(selection.amount_min)
    if selection.amount_max is not None:
        clauses.append("a.amount_minor <= %s")
        args.append(selection.amount_max)
    if selection.plan is not None:
        clauses.append(
            "EXISTS (SELECT 1 FROM subscriptions s WHERE s.id = a.subscription_id AND s.plan = %s)"
        )
        args.append(selection.plan)
    if keys:
        clauses.append(f"a.idempotency_key IN ({placeholders(len(keys))})")
        args.extend(keys)
    return " AND ".join(clauses), args


# -- the dry run ---------------------------------------------------------------------------


class Group(msgspec.Struct, frozen=True, kw_only=True):
    """The selected charges of one currency (and provider, or all providers)."""

    currency: str
    provider: str | None
    """None in the per-currency totals."""
    charges: int
    charged_minor: int
    reserved_minor: int
    """Already reversed, or held by a reversal in flight, unknown, pending or queued."""
    to_reverse_minor: int
    """charged - reserved: what the run would refund."""
    already_reversed: int
    """Charges with nothing left to refund (nothing would be published for them)."""


class _GroupRow(msgspec.Struct, frozen=True, array_like=True):
    currency: str
    provider: str
    charges: int
    charged_minor: int
    reserved_minor: int
    to_reverse_minor: int
    already_reversed: int


class Unselected(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    why: str
    """``no such charge`` or the charge's state."""


class Preview(msgspec.Struct, frozen=True, kw_only=True):
    """What ``--dry-run`` prints (``--json``: this struct)."""

    selection: dict[str, Any]
    charges: int
    by_currency: list[Group]
    by_provider: list[Group]
    unselected_keys: list[Unselected]
    cannot_refund: list[Group] = msgspec.field(default_factory=list)
    """Selected charges of providers payd cannot refund through (not configured here, or an
    adapter without refunds), per currency and provider: a run leaves them out, and they are
    not in the totals above."""


async def preview(cursor: Cursor, selection: Selection, refundable: Collection[str] | None = None) -> Preview:
    """The selection's totals, aggregated in the database (one query per chunk of keys); the
    charges of providers not in ``refundable`` (None: every provider can refund) apart."""
    merged: dict[tuple[str, str], list[int]] = {}
    for keys in chunks(selection):
        clause, args = where(selection, keys)
        await cursor.execute(
            "SELECT currency, provider, COUNT(*), CAST(SUM(amount) AS SIGNED), "  # noqa: S608
            "CAST(SUM(reserved) AS SIGNED), CAST(SUM(GREATEST(amount - reserved, 0)) AS SIGNED), "
            "CAST(SUM(reserved >= amount) AS SIGNED) FROM ("
            f"SELECT a.currency, {_CALLED_PROVIDER} AS provider, CAST(a.amount_minor AS SIGNED) AS amount, "
            f"{_RESERVED} AS reserved FROM attempts a WHERE {clause}) AS t GROUP BY currency, provider",
            (*RESERVING, *args),
        )
        for row in await fetch_all(cursor, _GroupRow):
            sums = merged.setdefault((row.currency, row.provider), [0] * 5)
            for i, value in enumerate(
                (
                    row.charges,
                    row.charged_minor,
                    row.reserved_minor,
                    row.to_reverse_minor,
                    row.already_reversed,
                )
            ):
                sums[i] += value
    cannot = {
        group: sums for group, sums in merged.items() if refundable is not None and group[1] not in refundable
    }
    merged = {group: sums for group, sums in merged.items() if group not in cannot}
    by_provider = [_group(currency, provider, sums) for (currency, provider), sums in sorted(merged.items())]
    totals: dict[str, list[int]] = {}
    for (currency, _provider), sums in merged.items():
        total = totals.setdefault(currency, [0] * 5)
        for i, value in enumerate(sums):
            total[i] += value
    return Preview(
        selection=selection.recorded(),
        charges=sum(group.charges for group in by_provider),
        by_currency=[_group(currency, None, sums) for currency, sums in sorted(totals.items())],
        by_provider=by_provider,
        unselected_keys=await unselected(cursor, selection),
        cannot_refund=[
            _group(currency, provider, sums) for (currency, provider), sums in sorted(cannot.items())
        ],
    )


def _group(currency: str, provider: str | None, sums: list[int]) -> Group:
    charges, charged, reserved, to_reverse, already = sums
    return Group(
        currency=currency,
        provider=provider,
        charges=charges,
        charged_minor=charged,
        reserved_minor=reserved,
        to_reverse_minor=to_reverse,
        already_reversed=already,
    )


async def unselected(cursor: Cursor, selection: Selection) -> list[Unselected]:
    """Keys the operator named that the selection leaves out, and why (unknown, not succeeded,
    or outside the other filters)."""
    if not selection.keys:
        return []
    found: dict[str, str] = {}
    selected: set[str] = set()
    for keys in chunks(selection):
        await cursor.execute(
            "SELECT idempotency_key, state FROM attempts "  # noqa: S608
            f"WHERE idempotency_key IN ({placeholders(len(keys))})",
            keys,
        )
        found.update({key: state for key, state in await cursor.fetchall()})
        clause, args = where(selection, keys)
        await cursor.execute(f"SELECT a.idempotency_key FROM attempts a WHERE {clause}", args)  # noqa: S608
        selected.update(key for (key,) in await cursor.fetchall())
    missing = []
    for key in sorted(set(selection.keys) - selected):
        state = found.get(key)
        why = (
            "no such charge"
            if state is None
            else f"charge is {state}"
            if state != "succeeded"
            else "outside the other filters"
        )
        missing.append(Unselected(key=key, why=why))
    return missing


# -- a run's frozen items --------------------------------------------------------------------


async def freeze(
    cursor: Cursor, run_id: int, run: str, selection: Selection, refundable: Collection[str] | None = None
) -> int:
    """Write the run's items (one INSERT ... SELECT per chunk of keys), only charges of
    ``refundable`` providers (None: any); return how many."""
    prefix = f"rollback:{run}:"
    frozen = 0
    for keys in chunks(selection):
        clause, args = where(selection, keys)
        if refundable is not None:
            names = sorted(refundable)
            clause += f" AND {_CALLED_PROVIDER} IN ({placeholders(len(names))})" if names else " AND FALSE"
            args.extend(names)
        frozen += await cursor.execute(
            "INSERT INTO rollback_items (run_id, attempt_id, charge_key, refund_key, provider, currency, "  # noqa: S608
            f"charged_minor, remaining_minor) SELECT %s, a.id, a.idempotency_key, {_REFUND_KEY_SQL}, "
            f"{_CALLED_PROVIDER}, a.currency, a.amount_minor, "
            f"GREATEST(CAST(a.amount_minor AS SIGNED) - {_RESERVED}, 0) FROM attempts a WHERE {clause}",
            (run_id, _MAX_KEY - len(prefix), prefix, prefix, *RESERVING, *args),
        )
    return frozen


class Run(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    name: str
    selection: dict[str, Any]
    reason: str | None
    created_by: str | None
    created_at: datetime


async def find_run(cursor: Cursor, name: str) -> Run | None:
    await cursor.execute(
        "SELECT id, name, filters, reason, created_by, created_at FROM rollback_runs WHERE name = %s", (name,)
    )
    row = await cursor.fetchone()
    if row is None:
        return None
    run_id, run_name, filters, reason, created_by, created_at = row
    return Run(
        id=run_id,
        name=run_name,
        selection=msgspec.json.decode(filters),
        reason=reason,
        created_by=created_by,
        created_at=created_at.replace(tzinfo=UTC),
    )


async def create_run(
    cursor: Cursor,
    name: str,
    selection: Selection,
    *,
    reason: str | None,
    created_by: str | None,
    refundable: Collection[str] | None = None,
) -> tuple[int, int]:
    """The run's row and its frozen items, in the caller's transaction: (run id, items)."""
    await cursor.execute(
        "INSERT INTO rollback_runs (name, filters, reason, created_by) VALUES (%s, %s, %s, %s)",
        (name, msgspec.json.encode(selection.recorded()).decode(), reason, created_by),
    )
    run_id = cursor.lastrowid
    return run_id, await freeze(cursor, run_id, name, selection, refundable)


# -- the report ------------------------------------------------------------------------------

OUTCOMES: Final = ("reversed", "already_reversed", "refused", "unknown", "pending", "not_published")

_OUTCOME_SQL: Final = (
    "CASE WHEN i.remaining_minor = 0 THEN 'already_reversed' "
    "WHEN r.state = 'succeeded' THEN 'reversed' "
    "WHEN r.state = 'failed' THEN 'refused' "
    "WHEN r.state = 'unknown' THEN 'unknown' "
    "WHEN r.state IS NOT NULL OR i.published_at IS NOT NULL THEN 'pending' "
    "ELSE 'not_published' END"
)
_ITEMS: Final = (
    "FROM rollback_items i LEFT JOIN reversals r ON r.idempotency_key = i.refund_key WHERE i.run_id = %s"
)
LISTED: Final = 20
"""Refused and unknown items named in the report (the rest: payd attempts list, or SQL)."""


class Tally(msgspec.Struct, frozen=True, kw_only=True):
    outcome: str
    currency: str
    charges: int
    amount_minor: int
    """The refunds' amount (for already_reversed: the charges' amount)."""


class _TallyRow(msgspec.Struct, frozen=True, array_like=True):
    outcome: str
    currency: str
    charges: int
    amount_minor: int


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    decline_code: str | None
    charges: int
    example: str | None
    """One reason as the daemon wrote it."""


class Item(msgspec.Struct, frozen=True, kw_only=True):
    charge_key: str
    refund_key: str
    state: str
    reason: str | None


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """A run's outcome so far (``--json``: this struct)."""

    run: str
    selection: dict[str, Any]
    reason: str | None
    created_by: str | None
    created_at: datetime
    items: int
    counts: dict[str, int]
    """Charges per outcome: reversed, already_reversed, refused, unknown, pending, not_published."""
    tallies: list[Tally]
    refusals: list[Refusal]
    refused: list[Item]
    unknown: list[Item]

    @property
    def unsettled(self) -> int:
        """Published, outcome not yet known (the daemon has not finished them)."""
        return self.counts["pending"]


async def report(cursor: Cursor, run: Run) -> Report:
    await cursor.execute(
        f"SELECT {_OUTCOME_SQL} AS bucket, i.currency, COUNT(*), "
        f"CAST(SUM(IF(i.remaining_minor = 0, i.charged_minor, i.remaining_minor)) AS SIGNED) {_ITEMS} "
        "GROUP BY bucket, i.currency ORDER BY bucket, i.currency",
        (run.id,),
    )
    tallies = [Tally(**msgspec.structs.asdict(row)) for row in await fetch_all(cursor, _TallyRow)]
    counts = dict.fromkeys(OUTCOMES, 0)
    for tally in tallies:
        counts[tally.outcome] += tally.charges
    await cursor.execute(
        f"SELECT r.decline_code, COUNT(*), MIN(r.result_reason) {_ITEMS} AND r.state = 'failed' "
        "GROUP BY r.decline_code ORDER BY COUNT(*) DESC",
        (run.id,),
    )
    refusals = [
        Refusal(decline_code=code, charges=n, example=why) for code, n, why in await cursor.fetchall()
    ]
    return Report(
        run=run.name,
        selection=run.selection,
        reason=run.reason,
        created_by=run.created_by,
        created_at=run.created_at,
        items=sum(counts.values()),
        counts=counts,
        tallies=tallies,
        refusals=refusals,
        refused=await _listed(cursor, run, "failed"),
        unknown=await _listed(cursor, run, "unknown"),
    )


async def _listed(cursor: Cursor, run: Run, state: str) -> list[Item]:
    await cursor.execute(
        f"SELECT i.charge_key, i.refund_key, r.state, r.result_reason {_ITEMS} AND r.state = %s "
        "ORDER BY i.attempt_id LIMIT %s",
        (run.id, state, LISTED),
    )
    return [
        Item(charge_key=charge, refund_key=refund, state=found, reason=why)
        for charge, refund, found, why in await cursor.fetchall()
    ]
