"""``payd subscriptions import FILE``: subscriptions from CSV or JSON lines, row by row.

Every row is validated with msgspec; a bad row is reported with its line
number and reason and the rest go on. Valid rows are inserted in multi-row
batches, each batch its own commit, so an interrupted import keeps what it
did. Re-importing is harmless: a subscription payd already holds is left as
it is (its lifecycle has moved on since), and counted as already present.
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Final, TextIO

import aiomysql
import msgspec
import pymysql

from daemon.models import Currency, Id, PositiveAmount, ShortText
from daemon.storage.db import placeholders, transaction
from daemon.subscriptions.model import CHARGEABLE, SubscriptionStatus
from daemon.subscriptions.networks import CardBrand
from daemon.subscriptions.periods import IntervalUnit, period_end, spread
from daemon.subscriptions.policy import SubscriptionPolicy

# The same guard as on attempt requests: a token, never a card number.
_CARD_NUMBER: Final = re.compile(r"(?:\d[ -]?){12,18}\d")
_PATH_IN_MESSAGE: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`\Z")
_ER_DATA_ERRORS: Final = (pymysql.err.DataError, pymysql.err.IntegrityError)

AsciiName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+\Z")]


class ImportRow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One subscription to import. Times are ISO 8601 (RFC 3339); without a zone, or a date
    alone (midnight), they are UTC."""

    id: Id
    provider: AsciiName
    payment_method: ShortText
    amount_minor: PositiveAmount
    currency: Currency
    billing_anchor: datetime
    """When cycle 1 starts; period ``c`` ends ``c`` intervals later."""
    interval_unit: IntervalUnit = IntervalUnit.MONTH
    interval_count: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    plan: AsciiName | None = None
    customer_ref: ShortText | None = None
    card_brand: CardBrand | None = None
    status: SubscriptionStatus = SubscriptionStatus.ACTIVE
    paid_cycle: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    """Cycles already paid; the next charge is for cycle ``paid_cycle + 1``."""
    next_attempt_at: datetime | None = None
    """Default: when the paid period ends (spread by the renewal jitter)."""

    def __post_init__(self) -> None:
        if _CARD_NUMBER.search(self.payment_method):
            raise ValueError("payment_method looks like a card number; import the provider's token")
        for name in ("billing_anchor", "next_attempt_at"):
            moment = getattr(self, name)
            if moment is not None and not 1970 <= moment.year <= 9000:
                raise ValueError(f"{name}: {moment.year} is out of range")
        if self.next_attempt_at is not None and self.status not in CHARGEABLE:
            raise ValueError(f"next_attempt_at: a {self.status.value} subscription is not scheduled")


FIELDS: Final = ImportRow.__struct_fields__
REQUIRED: Final = tuple(f.name for f in msgspec.structs.fields(ImportRow) if f.required)
_COLUMNS: Final = (
    "id, status, plan, provider, payment_method, card_brand, customer_ref, amount_minor, currency, "
    "interval_unit, interval_count, paid_cycle, billing_anchor, current_period_end, next_attempt_at"
)
_decode_json = msgspec.json.Decoder().decode
_TIMES: Final = ("billing_anchor", "next_attempt_at")
_DATE_ONLY: Final = re.compile(r"^\d{4}-\d{2}-\d{2}\Z")


class FileProblem(Exception):
    """The file as a whole cannot be imported (unreadable, unknown columns)."""


class ImportReport(msgspec.Struct, kw_only=True):
    rows: int = 0
    inserted: int = 0
    already_present: int = 0
    rejected: list[tuple[int, str]] = msgspec.field(default_factory=list)


def _reason(error: Exception) -> str:
    """``Expected `int`, got `str` - at `$.id``` reads better as ``id: Expected `int`, got `str```."""
    message = str(error)
    match = _PATH_IN_MESSAGE.search(message)
    if match is None:
        return message
    return f"{match['path']}: {message[: match.start()]}"


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)


def read_csv(stream: TextIO) -> Iterator[tuple[int, ImportRow | str]]:
    """(line number, row or the reason it is rejected); the header must name known columns."""
    reader = csv.DictReader(stream)
    header = reader.fieldnames or []
    unknown = [name for name in header if name not in FIELDS]
    if unknown:
        raise FileProblem(f"unknown column(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise FileProblem(f"missing column(s) {', '.join(missing)}")
    for record in reader:
        line = reader.line_num
        if None in record:
            yield line, "more fields than the header has columns"
            continue
        values: dict[str, Any] = {k: v.strip() for k, v in record.items() if v is not None and v.strip()}
        yield line, _row(values, strict=False)


def read_json_lines(stream: TextIO) -> Iterator[tuple[int, ImportRow | str]]:
    for line, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            values = _decode_json(text)
        except msgspec.DecodeError as error:
            yield line, f"not a JSON object: {error}"
            continue
        yield line, _row(values, strict=True) if isinstance(values, dict) else "not a JSON object"


def _row(values: dict[str, Any], *, strict: bool) -> ImportRow | str:
    """The validated row, or why not. A date without a time is midnight UTC."""
    for name in _TIMES:
        value = values.get(name)
        if isinstance(value, str) and _DATE_ONLY.match(value):
            values[name] = value + "T00:00:00"
    try:
        return msgspec.convert(values, ImportRow, strict=strict)
    except msgspec.ValidationError as error:
        return _reason(error)


def detect_format(path: str, first_line: str) -> str:
    lowered = path.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return "jsonl" if first_line.lstrip().startswith("{") else "csv"


class Importer:
    """Validates rows against this configuration and inserts them in batches."""

    def __init__(
        self,
        pool: aiomysql.Pool,
        *,
        providers: Collection[str],
        policy: SubscriptionPolicy,
        batch_size: int = 1000,
        progress: TextIO | None = None,
    ) -> None:
        self._pool = pool
        self._providers = providers
        self._policy = policy
        self._batch_size = batch_size
        self._progress = progress
        self.report = ImportReport()

    async def run(self, rows: Iterator[tuple[int, ImportRow | str]]) -> ImportReport:
        seen: dict[int, int] = {}
        batch: list[tuple[int, tuple[Any, ...]]] = []
        started = last_report = time.monotonic()
        for line, row in rows:
            self.report.rows += 1
            reason = self._check(row, seen, line)
            if reason is not None:
                self.report.rejected.append((line, reason))
            else:
                assert isinstance(row, ImportRow)
                batch.append((line, self._values(row)))
                if len(batch) >= self._batch_size:
                    await self._insert(batch)
                    batch = []
            if self._progress is not None and time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                self._report_progress(last_report - started)
        if batch:
            await self._insert(batch)
        self.report.rejected.sort()
        if self._progress is not None:
            self._report_progress(time.monotonic() - started)
        return self.report

    def _check(self, row: ImportRow | str, seen: dict[int, int], line: int) -> str | None:
        if isinstance(row, str):
            return row
        if row.provider not in self._providers:
            return f"provider: {row.provider!r} is not a configured provider"
        first = seen.setdefault(row.id, line)
        if first != line:
            return f"id: {row.id} is already on line {first}"
        return None

    def _values(self, row: ImportRow) -> tuple[Any, ...]:
        anchor = _utc(row.billing_anchor)
        paid_end = period_end(anchor, 0, row.paid_cycle, row.interval_unit, row.interval_count)
        if row.status not in CHARGEABLE:
            next_at = None
        elif row.next_attempt_at is not None:
            next_at = _utc(row.next_attempt_at)
        else:
            next_at = paid_end + spread(row.id, row.paid_cycle + 1, "renewal", self._policy.renewal_jitter_s)
        return (
            row.id,
            row.status.value,
            row.plan,
            row.provider,
            row.payment_method,
            None if row.card_brand is None else row.card_brand.value,
            row.customer_ref,
            row.amount_minor,
            row.currency,
            row.interval_unit.value,
            row.interval_count,
            row.paid_cycle,
            anchor,
            paid_end if row.paid_cycle > 0 else None,
            next_at,
        )

    async def _insert(self, batch: list[tuple[int, tuple[Any, ...]]]) -> None:
        refused = 0
        try:
            inserted = await self._insert_rows([values for _, values in batch])
        except _ER_DATA_ERRORS:
            # Something the row checks did not foresee: find the row, keep the others.
            inserted = 0
            for line, values in batch:
                try:
                    inserted += await self._insert_rows([values])
                except _ER_DATA_ERRORS as error:
                    refused += 1
                    self.report.rejected.append((line, f"refused by the database: {error.args[-1]}"))
        self.report.inserted += inserted
        self.report.already_present += len(batch) - refused - inserted

    async def _insert_rows(self, rows: list[tuple[Any, ...]]) -> int:
        async with transaction(self._pool) as cursor:
            await cursor.execute(
                f"INSERT INTO subscriptions ({_COLUMNS}) VALUES {placeholders(len(rows), 15)} "  # noqa: S608
                "ON DUPLICATE KEY UPDATE id = id",
                [value for row in rows for value in row],
            )
            return int(cursor.rowcount)

    def _report_progress(self, elapsed: float) -> None:
        r = self.report
        print(
            f"{r.rows} rows read, {r.inserted} imported, {r.already_present} already present, "
            f"{len(r.rejected)} rejected ({r.rows / max(elapsed, 1e-6):.0f} rows/s)",
            file=self._progress,
            flush=True,
        )
