"""The subscription commands of ``payd``: open what they need, run, say what happened."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from daemon.config import Config
from daemon.secrets import load_secret
from daemon.storage.db import close_pool, open_pool
from daemon.subscriptions.importer import (
    FileProblem,
    Importer,
    ImportReport,
    detect_format,
    read_csv,
    read_json_lines,
)
from daemon.subscriptions.manual import RetryRefused, retry_subscription
from daemon.subscriptions.policy import SubscriptionPolicy


async def retry(
    config: Config, subscription_id: int, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """``payd retry``: 0 dispatched, 1 refused (the reason on stderr)."""
    pool = await open_pool(config.mysql, load_secret("mysql_password"))
    try:
        dispatched = await retry_subscription(
            pool,
            subscription_id,
            policy=SubscriptionPolicy(config.subscriptions),
            providers=config.providers,
        )
    except RetryRefused as refusal:
        print(f"payd retry: refused: {refusal}", file=err)
        return 1
    finally:
        await close_pool(pool)
    print(
        f"dispatched {dispatched.idempotency_key}: subscription {dispatched.subscription_id} "
        f"({dispatched.status.value}), cycle {dispatched.cycle}, within the card networks' limits. "
        "The running daemons publish it from the outbox; its outcome arrives as payment.* and "
        "subscription.* events.",
        file=out,
    )
    return 0


async def import_subscriptions(
    config: Config,
    path: str,
    *,
    file_format: str | None = None,
    batch_size: int = 1000,
    out: TextIO = sys.stdout,
    progress: TextIO | None = sys.stderr,
) -> int:
    """``payd subscriptions import``: 0 all imported, 1 some rows rejected, 2 the file is unusable."""
    try:
        stream = _open(path)
    except OSError as error:
        print(f"payd subscriptions import: {path}: cannot read: {error.strerror}", file=out)
        return 2
    with stream:
        first_line = stream.readline()
        stream.seek(0)
        kind = file_format or detect_format(path, first_line)
        rows = read_csv(stream) if kind == "csv" else read_json_lines(stream)
        pool = await open_pool(config.mysql, load_secret("mysql_password"))
        try:
            importer = Importer(
                pool,
                providers=config.providers,
                policy=SubscriptionPolicy(config.subscriptions),
                batch_size=batch_size,
                progress=progress,
            )
            report = await importer.run(rows)
        except FileProblem as problem:
            print(f"payd subscriptions import: {path}: {problem}; nothing imported", file=out)
            return 2
        finally:
            await close_pool(pool)
    print_report(report, path, out)
    return 1 if report.rejected else 0


def _open(path: str) -> TextIO:
    # A local file read as it is consumed: each read is short next to a batch's round trip.
    return Path(path).open(encoding="utf-8", newline="")


def print_report(report: ImportReport, path: str, out: TextIO) -> None:
    for line, reason in report.rejected:
        print(f"{path}:{line}: rejected: {reason}", file=out)
    print(
        f"{path}: {report.rows} rows: {report.inserted} imported, {report.already_present} already "
        f"present (left unchanged), {len(report.rejected)} rejected",
        file=out,
    )
