"""The benchmark's traffic: attempt requests published with confirms, events consumed back.

Each request's key is ``bench-<run>-<i>``, so the index comes straight back
out of an event's ``idempotency_key`` and the timestamps live in flat lists.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

TERMINAL_EVENTS = frozenset({"payment.succeeded", "payment.declined", "payment.failed"})
UNKNOWN_EVENT = "payment.unknown"
PACE_TICK_S = 0.002

# The sandbox's outcome tokens (docs/sandbox.md); --mix picks among them.
SANDBOX_TOKENS = frozenset(
    {"pm_ok", "pm_insufficient_funds", "pm_stolen", "pm_rate_limited", "pm_error", "pm_timeout"}
)


def parse_mix(text: str) -> dict[str, float]:
    """``pm_ok=90,pm_stolen=10`` as weights; only the sandbox's tokens are accepted."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        token, _, weight = part.partition("=")
        token = token.strip()
        if token not in SANDBOX_TOKENS:
            raise ValueError(f"unknown payment method token {token!r}; known: {sorted(SANDBOX_TOKENS)}")
        mix[token] = float(weight) if weight else 1.0
        if not (math.isfinite(mix[token]) and mix[token] >= 0):
            raise ValueError(f"weight of {token} must be a finite number >= 0")
    if sum(mix.values()) <= 0:
        raise ValueError("mix weights must add up to more than 0")
    return mix


def build_requests(
    run_id: str, count: int, mix: dict[str, float], seed: int
) -> tuple[list[bytes], list[str]]:
    """Encoded request bodies and the token each one carries (seeded, so runs repeat)."""
    rng = random.Random(seed)  # picks test tokens, not secrets
    tokens = rng.choices(list(mix), weights=list(mix.values()), k=count)
    encode = msgspec.json.Encoder().encode
    bodies = [
        encode(
            {
                "idempotency_key": f"bench-{run_id}-{i}",
                # One subscription per attempt: (subscription, cycle) never collides.
                "subscription_id": i + 1,
                "cycle": 1,
                "amount_minor": 1000,
                "currency": "EUR",
                "provider": "sandbox",
                "payment_method": token,
            }
        )
        for i, token in enumerate(tokens)
    ]
    return bodies, tokens


@dataclass
class Tracker:
    """Publish and completion times per attempt index, and the event tallies."""

    run_id: str
    count: int
    published_at: list[float] = field(init=False)
    finished_at: list[float] = field(init=False)
    outcome: list[str | None] = field(init=False)
    published: int = 0
    finished: int = 0
    events: Counter[str] = field(default_factory=Counter)
    unknown_first: int = 0
    """Attempts whose first event was payment.unknown (later reconciled, or still unknown)."""
    repeated_terminal: int = 0
    """Terminal events for an attempt that already had one: at-least-once delivery at work."""
    foreign: int = 0
    """Events for keys of other runs (a stray earlier daemon): a sign something leaked."""
    first_publish: float = math.nan
    last_terminal: float = math.nan
    all_finished: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        # Monotonic + offset = wall clock, to line publish times up with MySQL's NOW(6).
        self.wall_offset = time.time() - time.monotonic()
        self.published_at = [math.nan] * self.count
        self.finished_at = [math.nan] * self.count
        self.outcome = [None] * self.count
        self._prefix = f"bench-{self.run_id}-"
        self._seen_unknown: set[int] = set()

    def mark_published(self, index: int, now: float) -> None:
        if self.published == 0:
            self.first_publish = now
        self.published_at[index] = now
        self.published += 1

    def mark_event(self, routing_key: str, key: str, now: float) -> None:
        if not key.startswith(self._prefix):
            self.foreign += 1
            return
        index = int(key[len(self._prefix) :])
        self.events[routing_key] += 1
        if routing_key == UNKNOWN_EVENT:
            if self.outcome[index] is None and index not in self._seen_unknown:
                self._seen_unknown.add(index)
                self.unknown_first += 1
            return
        if routing_key not in TERMINAL_EVENTS:
            return
        if self.outcome[index] is not None:
            self.repeated_terminal += 1
            return
        self.outcome[index] = routing_key
        self.finished_at[index] = now
        self.finished += 1
        self.last_terminal = now
        if self.finished == self.count:
            self.all_finished.set()

    def commit_latencies_s(self, commit_times: dict[str, float]) -> list[float]:
        """Publish -> outcome committed in MySQL, per attempt the database has finished."""
        return [
            at - (self.published_at[int(key[len(self._prefix) :])] + self.wall_offset)
            for key, at in commit_times.items()
            if key.startswith(self._prefix)
        ]

    def outbox_lags_s(self, commit_times: dict[str, float]) -> list[float]:
        """Outcome committed in MySQL -> its terminal event consumed here, per attempt that has
        both: the outbox relay's lag as a consumer of ``payd.events`` sees it (relay, broker
        routing and this harness's own delivery included). Same host, same clock."""
        lags = []
        for key, committed in commit_times.items():
            if key.startswith(self._prefix):
                seen = self.finished_at[int(key[len(self._prefix) :])]
                if not math.isnan(seen):
                    lags.append(seen + self.wall_offset - committed)
        return lags

    @property
    def key_prefix(self) -> str:
        return self._prefix

    def latencies_s(self) -> list[float]:
        return [
            done - sent
            for sent, done in zip(self.published_at, self.finished_at, strict=True)
            if not math.isnan(done)
        ]


class _EventHead(msgspec.Struct):
    """The one field of a payment event the harness needs; the rest is skipped unparsed."""

    idempotency_key: str


async def consume_events(connection: AbstractConnection, exchange: str, tracker: Tracker) -> AbstractChannel:
    """Bind a private queue to ``payment.#`` on the events exchange and feed ``tracker``.

    The queue is exclusive and auto-delete, so it vanishes with the connection;
    no_ack keeps the harness's own cost per event low.
    """
    channel = await connection.channel()
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key="payment.#")
    decode = msgspec.json.Decoder(_EventHead).decode

    async def on_event(message: AbstractIncomingMessage) -> None:
        now = time.monotonic()
        tracker.mark_event(message.routing_key or "", decode(message.body).idempotency_key, now)

    await queue.consume(on_event, no_ack=True)
    return channel


@dataclass
class PublishStats:
    seconds: float = 0.0
    max_lag_s: float = 0.0
    """How far publishing fell behind the --rate schedule at worst (0 in throughput mode)."""


async def publish_requests(
    connection: AbstractConnection,
    queue: str,
    bodies: list[bytes],
    tracker: Tracker,
    *,
    rate: float,
    window: int,
    message_for: Callable[[bytes], aio_pika.Message] | None = None,
) -> PublishStats:
    """Publish every body with confirms, at most ``window`` unconfirmed; pace to ``rate``/s if > 0.

    A semaphore bounds the window (asyncio.wait over a set of pending tasks
    costs O(window) per publish, which would make the harness its own bottleneck).
    """
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = channel.default_exchange
    slots = asyncio.Semaphore(window)
    failures: list[BaseException] = []
    pending: set[asyncio.Task[object]] = set()
    stats = PublishStats()

    def confirmed(task: asyncio.Task[object]) -> None:
        pending.discard(task)
        slots.release()
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    started = time.monotonic()
    for index, body in enumerate(bodies):
        if rate > 0:
            due = started + index / rate
            delay = due - time.monotonic()
            if delay > 0:
                # Sleep at least one tick and then send whatever fell due meanwhile:
                # one timer per message would cost the harness more than the publish.
                await asyncio.sleep(max(delay, PACE_TICK_S))
            stats.max_lag_s = max(stats.max_lag_s, time.monotonic() - due)
        await slots.acquire()
        if failures:
            raise failures[0]
        message = (
            message_for(body)
            if message_for is not None
            else aio_pika.Message(
                body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
        )
        tracker.mark_published(index, time.monotonic())
        task: asyncio.Task[object] = asyncio.create_task(
            exchange.publish(message, routing_key=queue, mandatory=True)
        )
        pending.add(task)
        task.add_done_callback(confirmed)
    if pending:
        await asyncio.wait(pending)
    if failures:
        raise failures[0]
    stats.seconds = time.monotonic() - started
    await channel.close()
    return stats
