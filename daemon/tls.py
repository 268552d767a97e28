"""TLS for payd's links to MySQL, RabbitMQ and Redis: one settings shape, one context builder.

A link is encrypted when its configuration says so: ``[mysql.tls]`` is present, the
RabbitMQ URL is ``amqps://``, the Redis URL is ``rediss://``. An encrypted link always
verifies the server's certificate chain, and its host name unless ``verify_hostname``
is false; there is no switch that turns verification off, since an unverified link
stops only a passive tap.

A handshake that fails (wrong CA, a name the certificate does not carry, a server
that does not speak TLS) is a ``TlsLinkError`` naming the link: retrying cannot fix
it, so start-up stops with exit status 2 like any other configuration error.
"""

from __future__ import annotations

import enum
import ipaddress
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from yarl import URL

from daemon.config import Config, ConfigError, TlsSettings
from daemon.secrets import Secret, load_secret

log = structlog.get_logger("payd.tls")


class Link(enum.StrEnum):
    MYSQL = "mysql"
    RABBITMQ = "rabbitmq"
    REDIS = "redis"


class TlsLinkError(ConfigError):
    """A link's TLS handshake failed: the server is not one the configuration trusts."""

    def __init__(self, link: Link, address: str, reason: str) -> None:
        super().__init__(
            f"{link} at {address}: TLS handshake failed: {reason} "
            f"(check [{link}.tls] and the server's certificate)"
        )
        self.link = link
        self.address = address
        self.reason = reason


# The ports a URL without one means (RabbitMQ's and Redis's documented defaults).
_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "redis": 6379, "rediss": 6379}


def url_address(url: str) -> str:
    """``host:port`` of a broker or Redis URL, for messages; never its credentials."""
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port or _DEFAULT_PORTS.get(parsed.scheme, '')}"


def key_password(link: Link) -> Secret | None:
    """The passphrase of the link's client key, from the secret ``LINK_tls_key_password``."""
    return load_secret(f"{link}_tls_key_password")


def client_context(link: Link, settings: TlsSettings) -> ssl.SSLContext:
    """An ``SSLContext`` that verifies the server as ``settings`` say; ``ConfigError`` names the bad key."""
    try:
        # With a cafile, only that bundle is trusted; without, the system's store.
        context = ssl.create_default_context(cafile=settings.ca_file or None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"{link}.tls.ca_file: cannot load {settings.ca_file}: {_reason(error)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = settings.verify_hostname
    if settings.cert_file:
        password = key_password(link)
        try:
            # An empty passphrase rather than None: None would make OpenSSL prompt on the terminal.
            context.load_cert_chain(
                settings.cert_file, settings.key_file or None, password=password.reveal() if password else ""
            )
        except (OSError, ssl.SSLError) as error:
            files = ", ".join(filter(None, (settings.cert_file, settings.key_file)))
            hint = "" if password else f" (an encrypted key needs the secret {link}_tls_key_password)"
            raise ConfigError(f"{link}.tls.cert_file: cannot load {files}: {_reason(error)}{hint}") from None
    return context


def redis_tls_options(settings: TlsSettings) -> dict[str, Any]:
    """The same settings as redis-py's keyword arguments (it builds its context itself).

    ``client_context`` is built first so a bad file or passphrase fails here, at start-up,
    with the key named, not at the first halt check.
    """
    client_context(Link.REDIS, settings)
    password = key_password(Link.REDIS)
    return {
        "ssl_ca_certs": settings.ca_file or None,
        "ssl_certfile": settings.cert_file or None,
        "ssl_keyfile": settings.key_file or None,
        "ssl_password": password.reveal() if password else None,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": settings.verify_hostname,
        "ssl_min_version": ssl.TLSVersion.TLSv1_2,
    }


@contextmanager
def naming_tls_failures(link: Link, address: str) -> Iterator[None]:
    """Turn a client library's wrapped TLS failure into a ``TlsLinkError`` naming the link."""
    try:
        yield
    except TlsLinkError:
        raise
    except Exception as error:
        cause = _ssl_cause(error)
        if cause is None:
            raise
        raise TlsLinkError(link, address, _reason(cause)) from error


def _ssl_cause(error: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind ``error``: aiomysql, aiormq and redis-py each wrap it differently."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
    return None


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason).lower().replace("_", " ")
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


# -- which links cross hosts in the clear (payd check-config) ----------------------


def is_loopback(host: str) -> bool:
    """Only ``localhost`` and loopback addresses; other names are not resolved (DNS may lie later)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plaintext_links(config: Config) -> list[tuple[Link, str]]:
    """Links to a host other than this one that are not encrypted: ``(link, host)``."""
    found = []
    if config.mysql.effective_tls is None and not is_loopback(config.mysql.host):
        found.append((Link.MYSQL, config.mysql.host))
    # Every broker node and every Sentinel: one remote node in the clear is a plaintext link.
    sentinels = [f"redis://{address}" for address in config.redis.sentinels]
    for link, urls, tls in (
        (Link.RABBITMQ, config.rabbitmq.nodes, config.rabbitmq.effective_tls),
        (Link.REDIS, (config.redis.url, *sentinels), config.redis.effective_tls),
    ):
        for url in map(URL, urls):
            if url.scheme == "unix":
                continue
            if tls is None and not is_loopback(url.host or ""):
                found.append((link, url.host or ""))
    return found


def log_plaintext_links(config: Config) -> None:
    """At start-up, the journal says what ``payd check-config`` would warn of."""
    for link, host in plaintext_links(config):
        log.warning("tls.plaintext_link", link=str(link), host=host, see=f"[{link}.tls]")


def check_links(config: Config) -> None:
    """Build every encrypted link's context, so unreadable files fail before anything connects."""
    for link, tls in (
        (Link.MYSQL, config.mysql.effective_tls),
        (Link.RABBITMQ, config.rabbitmq.effective_tls),
        (Link.REDIS, config.redis.effective_tls),
    ):
        if tls is not None:
            client_context(link, tls)
