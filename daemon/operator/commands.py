"""The operator commands of ``payd``: open what they need, run, print, return the exit status.

Exit statuses: 0 done, 1 refused or not found (the reason on stderr), 2 a
usage problem. ``--json`` output is the command's struct encoded as it is
(documented in docs/runbook.md).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TextIO

import aio_pika
import aiomysql
import aiormq
import msgspec
import pymysql

from daemon.config import Config
from daemon.operator.dead import DeadLetterQueueMissing, DeadList, list_dead, replay_dead
from daemon.operator.listing import AttemptFilter, list_attempts, render_list, short_age
from daemon.operator.settle import SettleAs, SettleInvalid, SettleOrder, SettleRefused, settle_attempt
from daemon.operator.story import load_story, render_story
from daemon.secrets import load_secret
from daemon.storage.db import close_pool, open_pool
from daemon.subscriptions.policy import SubscriptionPolicy

UNREACHABLE: Final = (
    pymysql.err.OperationalError,
    aio_pika.exceptions.AMQPConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    ConnectionError,
    OSError,
    TimeoutError,
)


async def reporting(command: str, work: Coroutine[Any, Any, int], err: TextIO = sys.stderr) -> int:
    """Run one operator command; a database or broker out of reach is a line and exit 1, not a trace."""
    try:
        return await work
    except UNREACHABLE as error:
        print(f"payd {command}: cannot reach the database or the broker: {error}", file=err)
        return 1


def resolve_operator(explicit: str | None) -> str | None:
    """Who is acting: ``--operator``, else the user behind sudo, else the login user."""
    for candidate in (explicit, os.environ.get("SUDO_USER"), os.environ.get("USER")):
        if candidate and candidate.strip():
            return candidate.strip()
    return None


def print_json(value: object, out: TextIO) -> None:
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode(), file=out)


@asynccontextmanager
async def _database(config: Config) -> AsyncIterator[aiomysql.Pool]:
    pool = await open_pool(config.mysql, load_secret("mysql_password"))
    try:
        yield pool
    finally:
        await close_pool(pool)


async def show(
    config: Config, key: str, *, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    async with _database(config) as pool:
        story = await load_story(pool, key)
    if as_json:
        print_json(story, out)
    else:
        render_story(story, out)
    if not story.found and story.subscription is None:
        print(f"payd attempts show: no attempt with key {key}", file=err)
        return 1
    return 0


async def list_(config: Config, wanted: AttemptFilter, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    async with _database(config) as pool:
        found = await list_attempts(pool, wanted)
    if as_json:
        print_json(found, out)
    else:
        render_list(found, wanted, out)
    return 0


async def settle(
    config: Config,
    key: str,
    *,
    settle_as: SettleAs,
    reason: str,
    operator: str | None,
    provider_ref: str | None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    who = resolve_operator(operator)
    if who is None:
        print("payd attempts settle: who are you? pass --operator NAME", file=err)
        return 2
    order = SettleOrder(
        idempotency_key=key,
        settle_as=settle_as,
        reason=reason,
        operator=who,
        via=f"cli@{socket.gethostname()}",
        provider_ref=provider_ref,
    )
    async with _database(config) as pool:
        try:
            settled = await settle_attempt(pool, order, policy=SubscriptionPolicy(config.subscriptions))
        except SettleInvalid as invalid:
            print(f"payd attempts settle: {invalid}", file=err)
            return 2
        except SettleRefused as refusal:
            print(f"payd attempts settle: refused: {refusal}", file=err)
            return 1
    if settled.operation == "refund":
        effect = f"; its subscription: {settled.subscription_effect}" if settled.subscription_effect else ""
        print(
            f"settled refund {key} of charge {settled.original_idempotency_key} as {settled.state.value} "
            f"(recorded: {who}, {order.via}){effect}. The running daemons publish "
            f"refund.{settled.state.value} from the outbox.",
            file=out,
        )
        return 0
    subscription = (
        f"; subscription {settled.subscription_id} cycle {settled.cycle} moved as by a real outcome"
        if settled.subscription_id is not None
        else ""
    )
    print(
        f"settled {key} as {settled.state.value} (recorded: {who}, {order.via}){subscription}. "
        f"The running daemons publish payment.{settled.state.value} from the outbox.",
        file=out,
    )
    return 0


def render_dead(found: DeadList, out: TextIO) -> None:
    if not found.messages:
        print(f"{found.queue} is empty", file=out)
        return
    width = max(len(letter.id) for letter in found.messages)
    print(f"{'id':<{width}} {'age':>6} {'size':>6}  {'key':<32} reason", file=out)
    for letter in found.messages:
        age = "-" if letter.age_s is None else short_age(letter.age_s)
        if letter.valid_now:
            now = ""
        elif letter.invalid_now == letter.reason:
            now = "  [still refused]"
        else:
            now = f"  [still refused: {letter.invalid_now}]"
        print(
            f"{letter.id:<{width}} {age:>6} {letter.size:>6}  {letter.idempotency_key or '-':<32} "
            f"{letter.reason}{now}",
            file=out,
        )
    more = f", first {len(found.messages)} shown (--limit)" if found.truncated else ""
    print(f"{found.depth} dead letters in {found.queue}{more}; none was removed", file=out)


async def dead_list(
    config: Config, *, limit: int, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    try:
        found = await list_dead(config, limit=limit)
    except DeadLetterQueueMissing as error:
        print(f"payd dead list: {error}", file=err)
        return 1
    if as_json:
        print_json(found, out)
    else:
        render_dead(found, out)
    return 0


async def dead_replay(
    config: Config,
    ids: Sequence[str] | None,
    *,
    operator: str | None,
    as_json: bool,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    who = resolve_operator(operator)
    if who is None:
        print("payd dead replay: who are you? pass --operator NAME", file=err)
        return 2
    try:
        report = await replay_dead(
            config, ids=ids, operator=f"{who} (cli@{socket.gethostname()})", progress=err
        )
    except DeadLetterQueueMissing as error:
        print(f"payd dead replay: {error}", file=err)
        return 1
    if as_json:
        print_json(report, out)
    else:
        for identity in report.not_found:
            print(f"not found: {identity} (replayed already, or held by another reader)", file=out)
        print(
            f"replayed {len(report.replayed)} dead letters to {report.queue}, each confirmed before it left "
            f"the dead-letter queue; {report.kept} left in place; {len(report.not_found)} not found",
            file=out,
        )
    return 1 if report.not_found else 0
