"""Logs reach stdout and a real GELF listener, secrets masked in both, and a stuck Graylog
never holds up the caller: the queue is bounded, what does not fit is dropped and counted.

The listeners here are real sockets on 127.0.0.1 that speak GELF the way Graylog does:
UDP datagrams, zlib- or gzip-compressed and possibly chunked, and TCP (or TLS) streams
of null-terminated JSON frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import logging
import secrets
import shutil
import socket
import ssl
import string
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import GelfSettings
from daemon.logs import (
    REDACTED,
    LoggingHandle,
    LogShippingCollector,
    configure_logging,
    redact_text,
    set_log_level,
)
from daemon.models import AttemptRequest

CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number
BEARER = "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.sig"
SECRETS = ("pm_card_visa_123", "hunter2", "eyJhbGciOiJIUzI1NiJ9", CARD, "amqp-pass-9")


# -- GELF listeners ----------------------------------------------------------------


def decode_gelf(payload: bytes) -> dict[str, Any]:
    if payload[:2] == b"\x1f\x8b":
        payload = gzip.decompress(payload)
    elif payload[:1] == b"\x78":
        payload = zlib.decompress(payload)
    return dict(json.loads(payload))


class GelfUdpListener:
    """Receives GELF datagrams; reassembles chunked messages (magic 0x1e 0x0f)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.messages: list[dict[str, Any]] = []
        self.chunked = 0
        self._chunks: dict[bytes, dict[int, bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                datagram = self.sock.recv(65535)
            except TimeoutError:
                continue
            if datagram[:2] == b"\x1e\x0f":
                message_id, sequence, total = datagram[2:10], datagram[10], datagram[11]
                parts = self._chunks.setdefault(message_id, {})
                parts[sequence] = datagram[12:]
                if len(parts) < total:
                    continue
                datagram = b"".join(parts[i] for i in range(total))
                del self._chunks[message_id]
                self.chunked += 1
            self.messages.append(decode_gelf(datagram))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class GelfTcpListener:
    """Accepts GELF TCP connections (optionally TLS) and splits the streams on null bytes."""

    def __init__(self, tls: ssl.SSLContext | None = None, *, read: bool = True) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        if not read:
            # A Graylog that accepts and then never reads: small buffers fill at once.
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.server.settimeout(0.1)
        self.port = int(self.server.getsockname()[1])
        self.tls = tls
        self.read = read
        self.messages: list[dict[str, Any]] = []
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            self.connections.append(connection)
            if self.read:
                reader = threading.Thread(target=self._read, args=(connection,), daemon=True)
                self._threads.append(reader)
                reader.start()

    def _read(self, connection: socket.socket) -> None:
        stream: socket.socket = connection
        if self.tls is not None:
            connection.settimeout(5)
            try:
                stream = self.tls.wrap_socket(connection, server_side=True)
            except OSError:
                return  # the client refused our certificate
        stream.settimeout(0.1)
        buffer = b""
        while not self._stop.is_set():
            try:
                data = stream.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
            *frames, buffer = buffer.split(b"\x00")
            self.messages.extend(json.loads(frame) for frame in frames if frame)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        for connection in self.connections:
            connection.close()
        self.server.close()


@contextlib.contextmanager
def udp_listener() -> Iterator[GelfUdpListener]:
    listener = GelfUdpListener()
    try:
        yield listener
    finally:
        listener.close()


@contextlib.contextmanager
def tcp_listener(tls: ssl.SSLContext | None = None, *, read: bool = True) -> Iterator[GelfTcpListener]:
    listener = GelfTcpListener(tls, read=read)
    try:
        yield listener
    finally:
        listener.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test configures logging its own way; the suite's set-up comes back afterwards."""
    yield
    configure_logging("warning", "console")


class Stdout(io.StringIO):
    """Stands in for stdout: what journald would get, as JSON lines."""

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines() if line.strip()]


@pytest.fixture
def stdout() -> Stdout:
    return Stdout()


def gelf(port: int, protocol: str = "udp", **settings: Any) -> GelfSettings:
    return GelfSettings(host="127.0.0.1", port=port, protocol=protocol, **settings)  # type: ignore[arg-type]


def log_an_attempt(log: Any, key: str = "k-1") -> None:
    """The canonical line, plus what careless callers pass along with it."""
    log.info(
        "attempt.finished",
        idempotency_key=key,
        attempt_id=17,
        provider="sandbox",
        subscription_id=42,
        cycle=3,
        amount_minor=1999,
        currency="EUR",
        outcome="approved",
        decline_code=None,
        provider_ref="ch_0001",
        tries=1,
        reason=f"gateway said: card {CARD} ok, password=hunter2",
        written=True,
        ms=12.5,
        payment_method="pm_card_visa_123",
        headers={"Authorization": BEARER, "x-api-key": "k-abc", "accept": "json"},
        broker="amqp://payd:amqp-pass-9@127.0.0.1:5672/",
    )


def assert_attempt_fields(fields: dict[str, Any], prefix: str = "") -> None:
    assert fields[f"{prefix}idempotency_key"] == "k-1"
    assert fields[f"{prefix}attempt_id"] == 17
    assert fields[f"{prefix}provider"] == "sandbox"
    assert fields[f"{prefix}outcome"] == "approved"
    assert fields[f"{prefix}amount_minor"] == 1999
    assert fields[f"{prefix}ms"] == 12.5
    assert fields[f"{prefix}written"] is True
    assert fields[f"{prefix}payment_method"] == REDACTED
    assert fields[f"{prefix}headers"] == {"Authorization": REDACTED, "x-api-key": REDACTED, "accept": "json"}
    assert fields[f"{prefix}broker"] == f"amqp://payd:{REDACTED}@127.0.0.1:5672/"
    assert fields[f"{prefix}reason"] == f"gateway said: card {REDACTED} ok, password={REDACTED}"


def assert_no_secret(payloads: list[dict[str, Any]]) -> None:
    text = json.dumps(payloads)
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked"


# -- tests ---------------------------------------------------------------------------


def test_udp_gelf_carries_the_attempt_line_with_secrets_masked_in_both_outputs(
    stdout: Stdout,
) -> None:
    """The attempt line arrives at a UDP GELF listener as Graylog decodes it (zlib, chunks
    reassembled), with its fields as additional fields; stdout has the same line; neither
    holds a token, a password, a bearer token or a card number."""
    with udp_listener() as listener:
        handle = configure_logging("info", "json", gelf(listener.port), stream=stdout)
        log = structlog.get_logger("payd.pipeline")
        structlog.contextvars.bind_contextvars(instance="host-a:1")
        try:
            log_an_attempt(log)
            # Letters only (no digits to look like a card), random: several UDP chunks.
            big = "".join(secrets.choice(string.ascii_letters) for _ in range(12000))
            log.warning("big.event", blob=big)
            try:
                raise ConnectionError("cannot reach amqp://payd:amqp-pass-9@mq:5672/")
            except ConnectionError:
                log.exception("broker.failed", token="pm_card_visa_123")
            logging.getLogger("aio_pika.robust").warning("library says password=%s", "hunter2")
            log.debug("not.shown")
        finally:
            structlog.contextvars.clear_contextvars()
        handle.close()
        wait_for(lambda: len(listener.messages) >= 4, 5, "four GELF messages")

    by_name = {m["short_message"]: m for m in listener.messages}
    assert set(by_name) == {
        "attempt.finished",
        "big.event",
        "broker.failed",
        "library says password=[redacted]",
    }
    attempt = by_name["attempt.finished"]
    assert_attempt_fields(attempt, prefix="_")
    assert attempt["level"] == 6
    assert attempt["_level_name"] == "info"
    assert attempt["facility"] == "payd"
    assert attempt["_logger"] == "payd.pipeline"
    assert attempt["_instance"] == "host-a:1"
    assert attempt["host"] == socket.gethostname()
    assert abs(attempt["timestamp"] - time.time()) < 30
    assert by_name["big.event"]["_blob"] == big
    assert listener.chunked >= 1, "the big event went out in chunks"
    failure = by_name["broker.failed"]
    assert failure["level"] == 3
    assert "ConnectionError" in failure["full_message"]
    assert failure["_token"] == REDACTED
    assert by_name["library says password=[redacted]"]["_logger"] == "aio_pika.robust"
    assert_no_secret(listener.messages)
    assert (handle.sent, handle.dropped, handle.failed) == (4, 0, 0)

    lines = stdout.lines()
    assert [line["event"] for line in lines] == [
        "attempt.finished",
        "big.event",
        "broker.failed",
        "library says password=[redacted]",
    ]
    assert_attempt_fields(lines[0])
    assert lines[0]["instance"] == "host-a:1"
    assert lines[0]["logger"] == "payd.pipeline"
    assert "ConnectionError" in lines[2]["exception"]
    assert_no_secret(lines)


def test_tcp_gelf_frames_arrive_in_order_and_close_flushes_the_queue(
    stdout: Stdout,
) -> None:
    """GELF over TCP: null-terminated frames, one per record; ``close`` sends what is still
    queued before it returns."""
    with tcp_listener() as listener:
        handle = configure_logging("info", "json", gelf(listener.port, "tcp"), stream=stdout)
        log = structlog.get_logger("payd.test")
        for number in range(300):
            log.info("tick", number=number, api_key="k-secret-1")
        handle.close()
        wait_for(lambda: len(listener.messages) >= 300, 5, "300 frames")
    assert [m["_number"] for m in listener.messages] == list(range(300))
    assert {m["_api_key"] for m in listener.messages} == {REDACTED}
    assert (handle.sent, handle.dropped, handle.failed) == (300, 0, 0)
    assert len(stdout.lines()) == 300


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a cert")
def test_tls_gelf_verifies_the_server_with_the_configured_ca(tmp_path: Path, stdout: Stdout) -> None:
    """GELF over TLS to a listener whose certificate is checked against ``tls_ca_file``."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    with tcp_listener(server) as listener:
        handle = configure_logging(
            "info", "json", gelf(listener.port, "tls", tls_ca_file=str(cert)), stream=stdout
        )
        log = structlog.get_logger("payd.test")
        log_an_attempt(log)
        handle.close()
        wait_for(lambda: len(listener.messages) >= 1, 5, "the TLS frame")
    assert_attempt_fields(listener.messages[0], prefix="_")
    assert handle.sent == 1


def test_unverifiable_tls_server_is_counted_as_failed_not_sent(tmp_path: Path, stdout: Stdout) -> None:
    """A TLS listener whose certificate the CA bundle does not vouch for gets nothing."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a cert")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=elsewhere.example", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    with tcp_listener(server) as listener:
        handle = configure_logging(
            "info", "json", gelf(listener.port, "tls", tls_ca_file=str(cert)), stream=stdout
        )
        structlog.get_logger("payd.test").info("hello")
        handle.close()
        time.sleep(0.2)
    assert listener.messages == []
    assert (handle.sent, handle.failed) == (0, 1)


def test_dead_graylog_costs_nothing_but_a_counter(
    stdout: Stdout,
) -> None:
    """Nothing listens on the GELF TCP port: records are counted as failed, none is waited
    for, and stdout still gets every line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])  # bound, never listening: connections are refused
        handle = configure_logging("info", "json", gelf(port, "tcp"), stream=stdout)
        log = structlog.get_logger("payd.test")
        slowest = 0.0
        for number in range(50):
            started = time.perf_counter()
            log.info("tick", number=number)
            slowest = max(slowest, time.perf_counter() - started)
        handle.close()
    assert slowest < 0.05
    assert (handle.sent, handle.failed, handle.dropped) == (0, 50, 0)
    assert len(stdout.lines()) == 50


async def test_graylog_that_never_reads_does_not_block_the_event_loop(
    stdout: Stdout,
) -> None:
    """A GELF TCP listener that accepts and never reads: the sender thread stalls on a full
    socket, the bounded queue fills, further records are dropped and counted, and neither a
    log call nor the event loop ever waits for Graylog. ``close`` is bounded too."""
    with tcp_listener(read=False) as listener:
        handle = configure_logging("info", "json", gelf(listener.port, "tcp", queue_size=100), stream=stdout)
        log = structlog.get_logger("payd.test")
        payload = "x" * 4096
        lags: list[float] = []
        running = True

        async def heartbeat() -> None:
            while running:
                started = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - started - 0.005)

        beat = asyncio.create_task(heartbeat())
        slowest = 0.0
        deadline = time.monotonic() + 20
        logged = 0
        while handle.dropped < 200 and time.monotonic() < deadline:
            for _ in range(20):
                started = time.perf_counter()
                log.info("tick", number=logged, payload=payload)
                slowest = max(slowest, time.perf_counter() - started)
                logged += 1
            await asyncio.sleep(0.001)
        running = False
        await beat
        started = time.monotonic()
        handle.close(timeout_s=0.5)
        close_took = time.monotonic() - started

    assert handle.dropped >= 200, f"nothing dropped after {logged} records: {handle.sent} sent"
    assert slowest < 0.05, f"a log call took {slowest * 1000:.0f} ms"
    assert max(lags) < 0.25, f"the event loop stalled for {max(lags) * 1000:.0f} ms"
    assert close_took < 2.0
    assert len(stdout.lines()) == logged, "stdout got every line all the same"


def test_log_shipping_counters_are_exposed_for_prometheus(
    stdout: Stdout,
) -> None:
    """The collector reports the current set-up's GELF counters."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        handle = configure_logging("info", "json", gelf(int(probe.getsockname()[1]), "tcp"), stream=stdout)
        for _ in range(3):
            structlog.get_logger("payd.test").info("tick")
        handle.close()
    registry = CollectorRegistry()
    registry.register(LogShippingCollector())
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert samples["payd_log_records_failed_total"] == 3
    assert samples["payd_log_records_dropped_total"] == 0
    assert samples["payd_log_records_sent_total"] == 0
    assert samples["payd_log_queue_depth"] == 0


def test_without_gelf_only_stdout_is_written(stdout: Stdout) -> None:
    handle: LoggingHandle = configure_logging("info", "json", GelfSettings(), stream=stdout)
    structlog.get_logger("payd.test").info("hello", password="hunter2")
    handle.close()
    assert not handle.gelf_enabled
    assert stdout.lines() == [
        {"event": "hello", "password": REDACTED, "level": "info", "logger": "payd.test", "timestamp": ANY_TS}
    ]


class _AnyTimestamp:
    __hash__ = None  # type: ignore[assignment]  # compares equal to many values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.endswith("Z") and "T" in other


ANY_TS: Any = _AnyTimestamp()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Authorization: {BEARER}", f"Authorization: {REDACTED}"),
        (f"sent header {BEARER} upstream", f"sent header Bearer {REDACTED} upstream"),
        ("amqp://payd:s3cret@127.0.0.1:5672/", f"amqp://payd:{REDACTED}@127.0.0.1:5672/"),
        ("password=hunter2 user=payd", f"password={REDACTED} user=payd"),
        ("{'mysql_password': 'abc', 'port': 1}", f"{{'mysql_password': '{REDACTED}', 'port': 1}}"),
        ('"api_key": "sk_live_123"', f'"api_key": "{REDACTED}"'),
        ("payment_method='pm_abc'", f"payment_method='{REDACTED}'"),
        ("authorization: Basic dXNlcjpwYXNz", f"authorization: {REDACTED}"),
        (f"card {CARD} declined", f"card {REDACTED} declined"),
        ("pan 4111-1111-1111-1111", f"pan {REDACTED}"),
        (
            "order 1234567890123456 (not a card: fails Luhn)",
            "order 1234567890123456 (not a card: fails Luhn)",
        ),
        ("idempotency_key=renewal:42:3 amount_minor=1999", "idempotency_key=renewal:42:3 amount_minor=1999"),
        ("took 12.5 ms, attempt 9007199254740993", "took 12.5 ms, attempt 9007199254740993"),
        ("event a4111111111111111f (hex id)", "event a4111111111111111f (hex id)"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_structs_and_nested_values_are_masked_without_touching_the_callers_objects(
    stdout: Stdout,
) -> None:
    """A wire struct logged whole shows every field but its payment_method; nested secret
    keys are masked in a copy, so the caller's dicts (message headers) keep their values."""
    configure_logging("info", "json", stream=stdout)
    request = AttemptRequest(
        idempotency_key="k-9", amount_minor=5, currency="EUR", provider="sandbox", payment_method="pm_x_1"
    )
    headers = {"Authorization": BEARER, "retries": [{"client_secret": "cs_1"}]}
    structlog.get_logger("payd.test").warning("odd.request", request=request, headers=headers)
    (line,) = stdout.lines()
    assert line["request"]["idempotency_key"] == "k-9"
    assert line["request"]["payment_method"] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED, "retries": [{"client_secret": REDACTED}]}
    assert headers["Authorization"] == BEARER, "the caller's dict was changed"


def test_set_log_level_reaches_loggers_already_in_use(stdout: Stdout) -> None:
    """``payd reload`` changes the level: loggers cached on first use follow, and so do
    libraries logging through the standard library (never below WARNING)."""
    configure_logging("warning", "json", stream=stdout)
    log = structlog.get_logger("payd.test")
    log.info("hidden.1")
    log.warning("shown.1")
    set_log_level("info")
    log.info("shown.2")
    logging.getLogger("aiormq").info("hidden.2")
    set_log_level("error")
    log.warning("hidden.3")
    logging.getLogger("aiormq").warning("hidden.4")
    log.error("shown.3")
    logging.getLogger("aiormq").error("shown.4")
    assert [line["event"] for line in stdout.lines()] == ["shown.1", "shown.2", "shown.3", "shown.4"]
