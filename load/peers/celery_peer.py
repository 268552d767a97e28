"""A Celery 5 worker doing payd's job the way a Celery shop would: the second yardstick.

    PEER_* settings in the environment, then:
    .venv/bin/celery -A load.peers.celery_peer worker --pool threads --concurrency 200 -Q QUEUE

One task per attempt, acknowledged late (after it returns): POST to the sandbox
with the idempotency key, INSERT the outcome (autocommit), publish the event with
a publisher confirm. Threads, each with its own HTTP session, MySQL connection
and producer, as Celery's threads pool is meant to be used. Like the lean
pipeline it keeps none of payd's guarantees (no claim, no outbox, no limits).

The benchmark harness (``load/bench.py --system celery``) starts it and sends
Celery protocol-2 task messages (see ``benchkit.traffic.celery_message``).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import requests
from celery import Celery
from celery.signals import worker_ready
from kombu import Exchange

QUEUE = os.environ.get("PEER_QUEUE", "payd_bench.peer.celery")
EVENTS = Exchange(os.environ.get("PEER_EVENTS_EXCHANGE", "payd_bench.events"), type="topic", durable=True)
SANDBOX_URL = os.environ.get("PEER_SANDBOX_URL", "http://127.0.0.1:8090")
DATABASE = os.environ.get("PEER_DATABASE", "payd_bench")
TIMEOUT_S = float(os.environ.get("PEER_TIMEOUT_S", "10"))
DB_POOL_SIZE = int(os.environ.get("PEER_DB_POOL_SIZE", "16"))

INSERT = (
    "INSERT INTO attempts (idempotency_key, subscription_id, cycle, provider, amount_minor, currency,"
    " payment_method, state, outcome, decline_code, provider_ref, finished_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NOW(6))"
    " ON DUPLICATE KEY UPDATE state = VALUES(state), finished_at = VALUES(finished_at)"
)


def _secret(name: str) -> str:
    value = os.environ.get(f"PAYD_{name.upper()}")
    if value is not None:
        return value
    return (Path(os.environ["CREDENTIALS_DIRECTORY"]) / name).read_text().rstrip("\r\n")


app = Celery("payd_peer", broker=os.environ.get("PEER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    accept_content=["json"],
    worker_hijack_root_logger=False,
    # A producer pool as large as the thread pool: every thread publishes its event confirmed.
    broker_pool_limit=None,
    broker_transport_options={"confirm_publish": True},
)

_local = threading.local()
# A bounded pool shared by the threads, as SQLAlchemy's would be: one MySQL
# connection per thread (200) would exceed the server's max_connections.
_connections: queue.LifoQueue[pymysql.connections.Connection[Any] | None] = queue.LifoQueue()
for _ in range(DB_POOL_SIZE):
    _connections.put(None)  # opened on first use


def _http() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    session: requests.Session = _local.session
    return session


@contextlib.contextmanager
def _database() -> Iterator[pymysql.connections.Connection[Any]]:
    connection = _connections.get()
    try:
        if connection is None:
            connection = pymysql.connect(
                host="127.0.0.1",
                port=3306,
                user="payd",
                password=_secret("mysql_password"),
                database=DATABASE,
                autocommit=True,
            )
        yield connection
    except pymysql.err.OperationalError:
        connection = None  # reconnect on the next use
        raise
    finally:
        _connections.put(connection)


@app.task(name="peers.charge", acks_late=True)
def charge(request: dict[str, Any]) -> None:
    session = _http()
    key = request["idempotency_key"]
    reference = f"{request['subscription_id']}:{request['cycle']}" if request.get("subscription_id") else key
    body = {
        "amount_minor": request["amount_minor"],
        "currency": request["currency"],
        "payment_method": request["payment_method"],
        "merchant_reference": reference,
        "customer_ref": None,
        "metadata": {},
    }
    decline_code = provider_ref = None
    try:
        response = session.post(
            f"{SANDBOX_URL}/v1/charges", json=body, headers={"Idempotency-Key": key}, timeout=TIMEOUT_S
        )
    except requests.RequestException:
        state, outcome = "failed", "error"
    else:
        if response.status_code in (200, 402):
            answer = response.json()
            approved = answer["status"] == "approved"
            state = "succeeded" if approved else "declined"
            outcome = "approved" if approved else "declined"
            decline_code, provider_ref = answer.get("decline_code"), answer["id"]
        else:
            state, outcome = "failed", f"http_{response.status_code}"
    with _database() as db, db.cursor() as cursor:
        cursor.execute(
            INSERT,
            (
                key,
                request.get("subscription_id"),
                request.get("cycle"),
                request["provider"],
                request["amount_minor"],
                request["currency"],
                request["payment_method"],
                state,
                outcome,
                decline_code,
                provider_ref,
            ),
        )
    event = {
        "type": f"payment.{state}",
        "idempotency_key": key,
        "subscription_id": request.get("subscription_id"),
        "cycle": request.get("cycle"),
        "provider": request["provider"],
        "amount_minor": request["amount_minor"],
        "currency": request["currency"],
        "outcome": outcome,
        "decline_code": decline_code,
        "provider_ref": provider_ref,
    }
    with app.producer_or_acquire() as producer:
        producer.publish(
            json.dumps(event),
            exchange=EVENTS,
            routing_key=f"payment.{state}",
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            declare=[EVENTS],
            retry=True,
        )


@worker_ready.connect
def _announce(**_: Any) -> None:
    ready_file = os.environ.get("PEER_READY_FILE")
    if ready_file:
        Path(ready_file).write_text("ready\n")
