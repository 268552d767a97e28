"""Secrets: read from the environment or systemd credential files, never printable.

A secret named ``mysql_password`` is looked up, in order, in the environment
variable ``PAYD_MYSQL_PASSWORD`` and in the file
``$CREDENTIALS_DIRECTORY/mysql_password`` (what systemd's ``LoadCredential=``
provides). config.toml never holds secrets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from daemon.errors import ConfigError

SECRET_NAMES: Final = (
    "mysql_password",
    "rabbitmq_password",
    "redis_password",
    "control_token",
    # Passphrases of encrypted client keys in [mysql.tls], [rabbitmq.tls], [redis.tls].
    "mysql_tls_key_password",
    "rabbitmq_tls_key_password",
    "redis_tls_key_password",
    # The built-in provider adapters' default credential names (each can be renamed per provider).
    "stripe_api_key",
    "adyen_api_key",
    "adyen_hmac_key",
    "checkout_api_key",
    "iyzico_api_key",
    "iyzico_secret_key",
)


class Secret:
    """A value that must never reach a log line, a repr or a traceback."""

    __slots__ = ("_source", "_value")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self._source = source

    def reveal(self) -> str:
        return self._value

    @property
    def source(self) -> str:
        """Where the value came from, safe to show (never the value itself)."""
        return self._source

    def __repr__(self) -> str:
        return f"Secret(<hidden, from {self._source}>)"

    __str__ = __repr__


def env_name(name: str) -> str:
    return f"PAYD_{name.upper()}"


def load_secret(name: str, environ: dict[str, str] | None = None) -> Secret | None:
    """The secret ``name`` from the environment or the credentials directory, or None."""
    env = os.environ if environ is None else environ
    variable = env_name(name)
    if variable in env:
        return Secret(env[variable], f"environment {variable}")
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory:
        path = Path(directory) / name
        if path.is_file():
            # Credential files conventionally end with a newline that is not part of the value.
            return Secret(path.read_text(encoding="utf-8").rstrip("\r\n"), f"credential file {path}")
    return None


def require_secret(name: str, *, needed_by: str) -> Secret:
    """The secret ``name``, or a configuration error saying where to put it (never a value)."""
    secret = load_secret(name)
    if secret is None or not secret.reveal():
        raise ConfigError(
            f"{needed_by}: secret {name} is not set: put it in the environment as {env_name(name)} "
            f"or in the credential file $CREDENTIALS_DIRECTORY/{name}"
        )
    return secret


def describe_secrets(environ: dict[str, str] | None = None) -> dict[str, str]:
    """For ``payd check-config``: which secrets are set and where from, never their values."""
    described = {}
    for name in SECRET_NAMES:
        secret = load_secret(name, environ)
        described[name] = f"set ({secret.source})" if secret else "not set"
    return described
