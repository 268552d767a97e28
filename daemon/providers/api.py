"""The provider API: the one module of payd a provider adapter imports, built-in or plugin.

Everything an adapter needs is here: the request it is given and the result it
returns, the outcomes, its capabilities and lookup answer, the configuration
base its table extends, secret names and secrets, the classified HTTP exchange
and the HTTP adapter skeleton. The names below are the contract; where they are
defined is not, so an adapter never imports ``daemon.config``, the pipeline or
the storage, and this module imports nothing that does (``tests/test_architecture.py``).
"""

from __future__ import annotations

from daemon.errors import ConfigError
from daemon.models import AttemptRequest, ChargeResult, Outcome, ReversalOperation, ReversalRequest
from daemon.providers.adapter import HttpAdapter
from daemon.providers.base import (
    Capabilities,
    LookupResult,
    NotificationRefused,
    Notifications,
    NotifiedProvider,
    PositiveFloat,
    Provider,
    ProviderConfig,
    ProviderFactory,
    RefundingProvider,
    ReversalNotice,
    SecretName,
    VoidingProvider,
)
from daemon.providers.http import HttpResponse, exchange, open_session, retry_after_seconds
from daemon.secrets import Secret, load_secret, require_secret

__all__ = [
    "AttemptRequest",
    "Capabilities",
    "ChargeResult",
    "ConfigError",
    "HttpAdapter",
    "HttpResponse",
    "LookupResult",
    "NotificationRefused",
    "Notifications",
    "NotifiedProvider",
    "Outcome",
    "PositiveFloat",
    "Provider",
    "ProviderConfig",
    "ProviderFactory",
    "RefundingProvider",
    "ReversalNotice",
    "ReversalOperation",
    "ReversalRequest",
    "Secret",
    "SecretName",
    "VoidingProvider",
    "exchange",
    "load_secret",
    "open_session",
    "require_secret",
    "retry_after_seconds",
]
