"""Logging: structlog JSON lines to stdout (journald), and GELF to Graylog when configured.

    log call -> context, level, logger name, timestamp, exception text -> redact
             -> GELF tap (a snapshot into a bounded queue) -> render -> stdout

Configured once per process by ``configure_logging``. The GELF side costs the
caller one encode and one non-blocking ``put_nowait``: a sender thread takes
the snapshots off the queue, turns them into GELF with graypy and sends them
over UDP, TCP or TLS. A slow or dead Graylog fills the queue, and further
records are dropped and counted instead of waited for, so it can never stall
the event loop. Records of libraries that log through the standard library
(aio-pika, aiohttp, asyncio) at WARNING and above take the same way.

Payment tokens and secrets never reach either output: ``redact`` masks values
under secret-looking keys (at any depth) and, in every string, bearer tokens,
credentials in URLs, ``password=...`` pairs and card numbers, whatever the
caller passed.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import logging
import queue
import re
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from logging.handlers import DatagramHandler, SocketHandler
from typing import TYPE_CHECKING, Any, Final, TextIO

import graypy
import msgspec
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from structlog.typing import EventDict, WrappedLogger

from daemon.cards import luhn_ok

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from daemon.config import GelfSettings

REDACTED: Final = "[redacted]"

# -- redaction ---------------------------------------------------------------------

_SECRET_KEYS: Final = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "payment_method",
        "pan",
        "card",
        "card_number",
        "cardnumber",
        "cvc",
        "cvv",
        "security_code",
        "iban",
    }
)
# A key ending in one of these is a secret: ``password``, ``mysql_password``,
# ``card_token``, ``access_token``, ``client_secret``, ``x_api_key``...
_SECRET_KEY_ENDINGS: Final = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "credential",
    "credentials",
    "private_key",
)

_SECRET_IN_TEXT: Final = re.compile(
    # "Bearer eyJhbGciOi..." anywhere in a message or an error.
    r"(?P<bearer>\bBearer\s+)[A-Za-z0-9._~+/=-]{6,}"
    # amqp://payd:PASSWORD@host, mysql://u:PASSWORD@h...
    r"|(?P<userinfo>\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?=@)"
    # password=..., "api_key": "...", authorization: Basic ..., payment_method='pm_...'
    r"|(?P<assign>\b(?:[a-z0-9]+[_-])*(?:password|passwd|pwd|secret|token|api[_-]?key|authorization"
    r"|payment[_-]method)[\"']?\s*[:=]\s*[\"']?)(?:(?:Bearer|Basic)\s+)?[^\s\"'&,;)}]+"
    # 13-19 digits, optionally grouped by spaces or dashes, standing alone (not inside a hex
    # id or a decimal), checked with Luhn below.
    r"|(?P<card>(?<![A-Za-z0-9.])(?:\d[ -]?){12,18}\d(?![A-Za-z0-9.]))",
    re.IGNORECASE,
)
_MAX_DEPTH: Final = 6


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    normal = key.lower().replace("-", "_")
    return normal in _SECRET_KEYS or normal.endswith(_SECRET_KEY_ENDINGS)


def _mask(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "card":
        digits = re.sub(r"[ -]", "", match.group())
        return REDACTED if luhn_ok(digits) else match.group()
    assert kind is not None
    return match.group(kind) + REDACTED


_DIGIT_RUN: Final = re.compile(r"\d[\d -]{11,}\d")


def _may_hold_secret(text: str) -> bool:
    """A cheap first look (substring tests run in C) that clears almost every value.

    The full pattern costs microseconds per string on every log line; this
    costs a fraction, and only what it cannot clear goes through the pattern.
    """
    if "://" in text:
        return True
    lowered = text.lower()
    return (
        "bearer" in lowered
        or "passw" in lowered
        or "pwd" in lowered
        or "secret" in lowered
        or "token" in lowered
        or "key" in lowered
        or "authoriz" in lowered
        or "payment" in lowered
        or _DIGIT_RUN.search(text) is not None
    )


def redact_text(text: str) -> str:
    """``text`` with bearer tokens, URL passwords, secret assignments and card numbers masked."""
    if len(text) < 5 or not _may_hold_secret(text):
        return text
    return _SECRET_IN_TEXT.sub(_mask, text)


_PLAIN: Final = frozenset({int, float, bool, type(None)})


def _scrub(value: Any, depth: int = 0) -> Any:
    """A secret-free version of ``value``; containers are copied, never changed in place."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, str):
        return redact_text(value)
    if depth >= _MAX_DEPTH:
        return redact_text(repr(value))
    if isinstance(value, Mapping):
        return {
            key: REDACTED if isinstance(key, str) and is_secret_key(key) else _scrub(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(item, depth + 1) for item in value]
    if isinstance(value, msgspec.Struct):
        # A wire struct's repr would show its payment_method: mask it field by field.
        return _scrub(msgspec.structs.asdict(value), depth)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    # What the renderers would print anyway (their fallback is repr), checked for secrets first.
    return redact_text(repr(value))


# Set by the processors before redaction, from nothing a caller passed.
_OWN_FIELDS: Final = frozenset({"timestamp", "level", "logger"})


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets in every value, the message and the exception text."""
    for key, value in event_dict.items():
        if key in _OWN_FIELDS:
            continue
        if is_secret_key(key):
            event_dict[key] = REDACTED
        elif type(value) is str:  # the common case, kept cheap: most strings are cleared at once
            if len(value) >= 5 and _may_hold_secret(value):
                event_dict[key] = _SECRET_IN_TEXT.sub(_mask, value)
        elif type(value) not in _PLAIN:
            event_dict[key] = _scrub(value)
    return event_dict


# -- logger names --------------------------------------------------------------------


class NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger that remembers the name given to ``structlog.get_logger(name)``."""

    def __init__(self, file: TextIO | None = None, name: str = "payd") -> None:
        super().__init__(file)
        self.name = name


class NamedWriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> NamedWriteLogger:
        return NamedWriteLogger(self._file, str(args[0]) if args else "payd")


def add_logger_name(logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    return event_dict


# -- GELF ----------------------------------------------------------------------------

_Snapshot = tuple[float, bytes]
_STOP: Final = (0.0, b"")
_encode_snapshot = msgspec.json.Encoder(enc_hook=repr).encode
_decode_snapshot = msgspec.json.Decoder(dict[str, Any]).decode
_LEVELS: Final = logging.getLevelNamesMapping()
# LogRecord attributes (and GELF's reserved ``id``) that an event field must not overwrite.
_RECORD_ATTRIBUTES: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "id"}
_FIELD_NAME_INVALID: Final = re.compile(r"[^\w.-]")
# Attributes every LogRecord has that graypy would send as empty extra fields.
_UNSENT_ATTRIBUTES: Final = ("stack_info", "taskName")


class TlsGelfHandler(graypy.GELFTCPHandler):  # type: ignore[misc]  # graypy ships no type hints
    """GELF over TLS that verifies the server's certificate and name.

    graypy's own TLS handler does not check the host name and uses
    ``ssl.wrap_socket``, which Python 3.12 removed.
    """

    def __init__(self, host: str, port: int, *, ca_file: str = "", **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self.context = ssl.create_default_context(cafile=ca_file or None)

    def makeSocket(self, timeout: float = 1) -> ssl.SSLSocket:
        plain = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            return self.context.wrap_socket(plain, server_hostname=self.host)
        except BaseException:
            plain.close()
            raise


def gelf_handler(settings: GelfSettings) -> logging.Handler:
    """graypy's handler for ``settings.protocol``; it builds, frames and sends GELF."""
    common: dict[str, Any] = {
        "debugging_fields": False,  # file and line of logs.py, not of the caller: noise
        "extra_fields": True,
        "facility": "payd",
        "localname": socket.gethostname(),
    }
    if settings.protocol == "udp":
        return graypy.GELFUDPHandler(settings.host, settings.port, **common)  # type: ignore[no-any-return]
    if settings.protocol == "tcp":
        return graypy.GELFTCPHandler(settings.host, settings.port, **common)  # type: ignore[no-any-return]
    return TlsGelfHandler(settings.host, settings.port, ca_file=settings.tls_ca_file, **common)


def gelf_record(created: float, fields: dict[str, Any]) -> logging.LogRecord:
    """A LogRecord that graypy turns into the GELF message for one structlog event.

    The event name is the short message, an exception's text the full message,
    and every other field an additional field (graypy prefixes ``_``).
    """
    level = str(fields.pop("level", "info"))
    event = fields.pop("event", "")
    name = str(fields.pop("logger", "payd"))
    exception = fields.pop("exception", None)
    fields.pop("timestamp", None)  # GELF carries ``created`` as its own timestamp
    record = logging.LogRecord(name, _LEVELS.get(level.upper(), logging.INFO), "", 0, str(event), None, None)
    record.created = created
    if exception:
        record.exc_text = str(exception)
    for attribute in _UNSENT_ATTRIBUTES:
        record.__dict__.pop(attribute, None)
    extra = record.__dict__
    extra["level_name"] = level
    for key, value in fields.items():
        field = _FIELD_NAME_INVALID.sub("_", str(key)).lstrip("_") or "field"
        if field in _RECORD_ATTRIBUTES or field == "level_name":
            field += "_"
        extra[field] = value
    return record


class GelfSender:
    """The thread that sends GELF, fed through a bounded queue it alone drains."""

    def __init__(self, handler: logging.Handler, queue_size: int) -> None:
        self.handler = handler
        self._queue: queue.Queue[_Snapshot] = queue.Queue(maxsize=queue_size)
        self._stream = isinstance(handler, SocketHandler) and not isinstance(handler, DatagramHandler)
        self.dropped = 0
        """Records not sent because the queue was full (or still queued at close)."""
        self.failed = 0
        """Records taken from the queue that could not be sent (Graylog down, unencodable)."""
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="payd-gelf-sender", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def offer(self, event_dict: EventDict) -> None:
        """Called on the logging thread: snapshot the event, never wait for room."""
        try:
            snapshot = (time.time(), _encode_snapshot(event_dict))
        except (TypeError, ValueError, msgspec.EncodeError):
            self.failed += 1
            return
        try:
            self._queue.put_nowait(snapshot)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            snapshot = self._queue.get()
            if snapshot is _STOP:
                return
            try:
                if self._send(snapshot):
                    self.sent += 1
                else:
                    self.failed += 1
            except Exception:
                # Nowhere to report this but the counter: logging it would feed the queue.
                self.failed += 1

    def _send(self, snapshot: _Snapshot) -> bool:
        created, payload = snapshot
        record = gelf_record(created, _decode_snapshot(payload))
        self.handler.send(self.handler.makePickle(record))  # type: ignore[attr-defined]
        # The TCP and TLS handlers swallow connection errors and drop their socket
        # (reconnecting later, with backoff); UDP raises instead.
        return not self._stream or self.handler.sock is not None  # type: ignore[attr-defined]

    def close(self, timeout_s: float) -> None:
        """Send what is queued within ``timeout_s``; what is left then is counted as dropped."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout_s)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            # Stuck on an unresponsive Graylog; it is a daemon thread and dies with the process.
            self.dropped += self._queue.qsize()
            return
        self.handler.close()


# -- set-up --------------------------------------------------------------------------


class LoggingHandle:
    """What ``configure_logging`` set up: GELF counters for metrics, and ``close`` for shutdown."""

    def __init__(self, sender: GelfSender | None) -> None:
        self._sender = sender
        self._closed = False

    @property
    def gelf_enabled(self) -> bool:
        return self._sender is not None

    @property
    def dropped(self) -> int:
        return self._sender.dropped if self._sender else 0

    @property
    def failed(self) -> int:
        return self._sender.failed if self._sender else 0

    @property
    def sent(self) -> int:
        return self._sender.sent if self._sender else 0

    @property
    def queued(self) -> int:
        return self._sender.queued if self._sender else 0

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop shipping and flush the GELF queue for at most ``timeout_s``. Idempotent."""
        global _sender  # noqa: PLW0603 (the tap reads the module's current sender)
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._sender is not None:
            if _sender is self._sender:
                _sender = None
            self._sender.close(timeout_s)


_sender: GelfSender | None = None
_handle: LoggingHandle | None = None
_threshold = logging.INFO
_bridge: StdlibToStructlog | None = None
_METHOD_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def filter_by_level(_logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: drop events below the current level.

    A processor rather than structlog's filtering wrapper, because loggers are
    cached on first use and ``set_log_level`` must reach those too.
    """
    if _METHOD_LEVELS.get(method, logging.INFO) < _threshold:
        raise structlog.DropEvent
    return event_dict


def set_log_level(level: str) -> None:
    """Change the level of every logger at once, cached ones included (``payd reload``)."""
    global _threshold  # noqa: PLW0603 (read by filter_by_level on every event)
    _threshold = _LEVELS[level.upper()]
    if _bridge is not None:
        _bridge.setLevel(max(_threshold, logging.WARNING))


def ship_to_gelf(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hand a snapshot to the GELF sender, if one runs.

    It reads the module's current sender on each call, so loggers cached
    before a reconfiguration follow it.
    """
    sender = _sender
    if sender is not None:
        sender.offer(event_dict)
    return event_dict


class StdlibToStructlog(logging.Handler):
    """Routes records of libraries that log through the standard library into structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger(record.name).log(
                record.levelno, record.getMessage(), exc_info=record.exc_info or None
            )
        except Exception:
            self.handleError(record)


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    gelf: GelfSettings | None = None,
    *,
    stream: TextIO | None = None,
) -> LoggingHandle:
    """Set up logging for the process: lines to ``stream`` (stdout), GELF when ``gelf`` names a host.

    Calling it again replaces the previous set-up (and closes its GELF sender).
    Call ``close()`` on the result at shutdown so queued GELF records go out.
    """
    stream = sys.stdout if stream is None else stream
    global _sender, _handle, _bridge  # noqa: PLW0603 (one logging set-up per process)
    if _handle is not None:
        _handle.close()
    sender = GelfSender(gelf_handler(gelf), gelf.queue_size) if gelf is not None and gelf.host else None
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Before redaction, so that tracebacks are scanned for secrets too.
            structlog.processors.format_exc_info,
            redact,
            ship_to_gelf,
            renderer,
        ],
        # Everything passes the wrapper; filter_by_level decides, so the level can change later.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=NamedWriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, StdlibToStructlog)]:
        root.removeHandler(old)
    _bridge = StdlibToStructlog()
    root.addHandler(_bridge)
    set_log_level(level)

    _sender = sender
    _handle = LoggingHandle(sender)
    atexit.register(_handle.close)
    return _handle


def current_logging() -> LoggingHandle | None:
    """The handle of the current set-up, if ``configure_logging`` ran."""
    return _handle


class LogShippingCollector:
    """Prometheus collector for the GELF sender's counters (zero while GELF is off).

    It reads the current set-up at scrape time, so any number of registries
    (one per daemon in tests) can register one.
    """

    def collect(self) -> Iterable[Metric]:
        handle = _handle
        values = {
            "dropped": handle.dropped if handle else 0,
            "failed": handle.failed if handle else 0,
            "sent": handle.sent if handle else 0,
        }
        yield CounterMetricFamily(
            "payd_log_records_dropped",
            "GELF log records dropped because the send queue was full (Graylog slow or down)",
            value=values["dropped"],
        )
        yield CounterMetricFamily(
            "payd_log_records_failed",
            "GELF log records that could not be sent (connection refused, timed out)",
            value=values["failed"],
        )
        yield CounterMetricFamily("payd_log_records_sent", "GELF log records sent", value=values["sent"])
        yield GaugeMetricFamily(
            "payd_log_queue_depth",
            "GELF log records waiting for the sender thread",
            value=handle.queued if handle else 0,
        )
