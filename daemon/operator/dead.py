"""``payd dead list`` and ``payd dead replay``: the dead-letter queue, read and re-published.

Reading without losing: messages are taken with ``basic.get`` (manual ack)
and held unacknowledged until the end of the pass, so none is seen twice and
none leaves the queue, then returned with one ``basic.nack`` (requeue). A
nack is the gentlest return AMQP offers: closing the channel with messages
outstanding counts as a failed delivery on a quorum queue, a nack does not
(RabbitMQ 4.3+). Before 4.3 a nack did count, and since 4.0 a quorum queue
drops a message returned more than ``delivery-limit`` times (default 20) when
it has no dead-letter exchange of its own, as ``payd.attempts.dead`` has not
(https://www.rabbitmq.com/docs/quorum-queues, "Poison Message Handling" and
"When is delivery count incremented?"). So a listing never lets a message's
``x-delivery-count`` climb: one that has reached ``REFRESH_AT`` is re-published
to the dead-letter queue as a fresh copy (same body, id and reason) and the
worn one acked only after the copy's confirm.

Replaying: a chosen message is published to ``payd.attempts`` with publisher
confirms and acked on the dead-letter queue only after its confirm. Intake
judges it again; a key already processed is stopped by the claim, so a
replay, or two, charges nothing twice. A replayed message that intake refuses
again comes back carrying the pass's ``x-payd-replayed-at``, so the same pass
leaves it where it is instead of looping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import time
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from daemon.broker import BROKER_ERRORS, DEAD_AT_HEADER, ERROR_HEADER, Topology, broker_url
from daemon.config import Config
from daemon.events import now_iso
from daemon.pipeline.intake import Invalid, decode_request
from daemon.secrets import load_secret

REFRESH_AT: Final = 10
"""A listed message returned this often is refreshed: half RabbitMQ 4's default limit of 20."""
REPLAYED_AT_HEADER: Final = "x-payd-replayed-at"
WINDOW: Final = 64
"""Replays awaiting their confirm at once."""
_BROKER_HEADERS: Final = (
    "x-death",
    "x-first-death-",
    "x-last-death-",
    "x-delivery-count",
    "x-acquired-count",
)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    """The message id, or ``sha256:`` and the start of the body's hash when it has none."""
    reason: str
    idempotency_key: str | None
    """When the body decodes far enough to have one."""
    dead_lettered_at: datetime | None
    age_s: int | None
    size: int
    delivery_count: int
    valid_now: bool
    """Whether intake, under this configuration, would accept it now."""
    invalid_now: str | None


class DeadList(msgspec.Struct, frozen=True, kw_only=True):
    queue: str
    depth: int
    """Messages ready in the queue when the listing began."""
    messages: list[DeadLetter]
    truncated: bool


class ReplayReport(msgspec.Struct, frozen=True, kw_only=True):
    queue: str
    replayed: list[str]
    """Ids published to the attempts queue (confirmed) and removed from the dead-letter queue."""
    not_found: list[str]
    kept: int
    """Dead letters left where they were (not chosen)."""
    complete: bool = True
    """False when the pass stopped at its time bound; what was not read stays in the queue."""


class DeadLetterQueueMissing(Exception):
    """The dead-letter queue does not exist: no daemon has declared payd's topology here."""


class _KeyOnly(msgspec.Struct):
    idempotency_key: str | None = None


_decode_key = msgspec.json.Decoder(_KeyOnly).decode


def message_identity(message: AbstractIncomingMessage) -> str:
    return message.message_id or "sha256:" + hashlib.sha256(message.body).hexdigest()[:16]


def _reason(headers: dict[str, Any]) -> str:
    if ERROR_HEADER in headers:
        return str(headers[ERROR_HEADER])
    death = headers.get("x-first-death-reason")
    if death == "delivery_limit":
        return "delivery_limit: redelivered too often (it may crash or stall the daemon)"
    return f"dead-lettered by the broker: {death}" if death else "no reason recorded"


def _dead_at(headers: dict[str, Any]) -> datetime | None:
    stamp = headers.get(DEAD_AT_HEADER)
    if isinstance(stamp, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        moment = deaths[0].get("time")
        if isinstance(moment, datetime):
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


def describe(message: AbstractIncomingMessage, config: Config) -> DeadLetter:
    headers = dict(message.headers or {})
    key: str | None = None
    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
        key = _decode_key(message.body).idempotency_key
    dead_at = _dead_at(headers)
    verdict = decode_request(message.body, config.providers)
    return DeadLetter(
        id=message_identity(message),
        reason=_reason(headers),
        idempotency_key=key,
        dead_lettered_at=dead_at,
        age_s=None if dead_at is None else int((datetime.now(UTC) - dead_at).total_seconds()),
        size=len(message.body),
        delivery_count=_count(headers.get("x-delivery-count")),
        valid_now=not isinstance(verdict, Invalid),
        invalid_now=verdict.reason if isinstance(verdict, Invalid) else None,
    )


class _DeadQueue(msgspec.Struct, kw_only=True):
    topology: Topology
    queue: AbstractQueue
    publishing: AbstractChannel
    depth: int


@contextlib.asynccontextmanager
async def _open(config: Config) -> AsyncIterator[_DeadQueue]:
    url = broker_url(config.rabbitmq, load_secret("rabbitmq_password"))
    connection = await aio_pika.connect(url, client_properties={"connection_name": "payd dead-letters"})
    try:
        topology = Topology.for_namespace(config.rabbitmq.namespace)
        reading = await connection.channel(publisher_confirms=False)
        try:
            # passive: look, never create; a missing queue closes the channel with 404.
            queue = await reading.declare_queue(topology.dead_queue, passive=True)
        except aio_pika.exceptions.ChannelClosed as error:
            raise DeadLetterQueueMissing(f"no queue {topology.dead_queue}: {error}") from None
        result = queue.declaration_result
        depth = int(result.message_count or 0) if result is not None else 0
        publishing = await connection.channel(publisher_confirms=True)
        yield _DeadQueue(topology=topology, queue=queue, publishing=publishing, depth=depth)
    finally:
        await connection.close()


async def _take(queue: AbstractQueue, limit: int | None = None) -> AsyncIterator[AbstractIncomingMessage]:
    """Every ready message, up to ``limit``. Each stays ours, unacknowledged, until the caller
    settles it, so none comes back within the pass. The queue's depth as declared is not the
    bound: messages another reader just returned may not be counted in it yet."""
    taken = 0
    while limit is None or taken < limit:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return
        taken += 1
        yield message


def _past(until: float | None) -> bool:
    return until is not None and time.monotonic() >= until


def _fresh_headers(message: AbstractIncomingMessage, extra: dict[str, Any]) -> dict[str, Any]:
    """The message's own headers without the broker's delivery bookkeeping, plus ``extra``."""
    kept = {k: v for k, v in (message.headers or {}).items() if not k.startswith(_BROKER_HEADERS)}
    return {**kept, **extra}


async def _publish(
    channel: AbstractChannel, routing_key: str, message: AbstractIncomingMessage, headers: dict[str, Any]
) -> None:
    """Publish a copy and wait for the broker's confirm (aio-pika raises on a nack or a return)."""
    await channel.default_exchange.publish(
        aio_pika.Message(
            message.body,
            headers=headers,
            message_id=message.message_id,
            content_type=message.content_type or "application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=routing_key,
        mandatory=True,
    )


async def list_dead(config: Config, *, limit: int, until: float | None = None) -> DeadList:
    """At most ``limit`` dead letters, read until the queue is empty or ``until`` (monotonic)."""
    async with _open(config) as dead:
        held: list[AbstractIncomingMessage] = []
        worn: list[tuple[AbstractIncomingMessage, DeadLetter]] = []
        shown: list[DeadLetter] = []
        truncated = False
        try:
            async for message in _take(dead.queue):
                if len(shown) == limit or _past(until):
                    held.append(message)
                    truncated = True
                    break
                letter = describe(message, config)
                shown.append(letter)
                if letter.delivery_count >= REFRESH_AT:
                    worn.append((message, letter))
                else:
                    held.append(message)
            # Refreshed only now: a copy published during the pass would be read again.
            for message, letter in worn:
                stamp = (letter.dead_lettered_at or datetime.now(UTC)).isoformat()
                await _publish(
                    dead.publishing,
                    dead.topology.dead_queue,
                    message,
                    _fresh_headers(message, {DEAD_AT_HEADER: stamp}),
                )
                await message.ack()
        finally:
            if held:
                await held[-1].nack(multiple=True, requeue=True)
        return DeadList(queue=dead.topology.dead_queue, depth=dead.depth, messages=shown, truncated=truncated)


async def replay_dead(
    config: Config,
    *,
    ids: Collection[str] | None,
    operator: str,
    progress: TextIO | None = sys.stderr,
    until: float | None = None,
) -> ReplayReport:
    """Re-publish the chosen dead letters (``ids=None``: all) to the attempts queue."""
    wanted = None if ids is None else set(ids)
    replayed: list[str] = []
    found: set[str] = set()
    kept = 0
    async with _open(config) as dead:
        held: list[AbstractIncomingMessage] = []
        pending: set[asyncio.Task[str]] = set()
        last_report = time.monotonic()
        started = now_iso()
        complete = True

        async def send(message: AbstractIncomingMessage, identity: str) -> str:
            headers = _fresh_headers(
                message,
                {
                    "x-payd-replayed-by": operator,
                    REPLAYED_AT_HEADER: now_iso(),
                    "x-payd-previous-error": _reason(dict(message.headers or {})),
                },
            )
            headers.pop(ERROR_HEADER, None)
            try:
                await _publish(dead.publishing, dead.topology.attempts_queue, message, headers)
            except BaseException:
                with contextlib.suppress(*BROKER_ERRORS):
                    await message.nack(requeue=True)  # not confirmed: it stays a dead letter
                raise
            await message.ack()  # only now, after the confirm: never lost in between
            return identity

        try:
            async for message in _take(dead.queue):
                if _past(until):
                    held.append(message)
                    complete = False
                    break
                identity = message_identity(message)
                replayed_at = (message.headers or {}).get(REPLAYED_AT_HEADER)
                again = isinstance(replayed_at, str) and replayed_at >= started  # refused again, this pass
                if again or (wanted is not None and identity not in wanted):
                    held.append(message)
                    kept += 1
                    continue
                found.add(identity)
                pending.add(asyncio.create_task(send(message, identity)))
                if len(pending) >= WINDOW:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    replayed += [task.result() for task in done]
                if progress is not None and time.monotonic() - last_report >= 1.0:
                    last_report = time.monotonic()
                    print(f"replayed {len(replayed)} so far", file=progress, flush=True)
            if pending:
                replayed += await asyncio.gather(*pending)
        finally:
            for task in pending:
                task.cancel()
            if held:
                await held[-1].nack(multiple=True, requeue=True)
        # Cut short, an id not reached yet is not known to be missing.
        missing = sorted(set() if wanted is None or not complete else wanted - found)
        return ReplayReport(
            queue=dead.topology.attempts_queue,
            replayed=replayed,
            not_found=missing,
            kept=kept,
            complete=complete,
        )
