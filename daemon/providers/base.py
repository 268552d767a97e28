"""The provider interface every adapter implements, and what payd knows of its capabilities."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec

from daemon.config import ProviderConfig
from daemon.models import AttemptRequest, ChargeResult


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What reconciliation may rely on for one provider."""

    honours_idempotency_key: bool
    """A repeated request with the same key can never charge twice."""
    lookup_by_key: bool
    """An earlier attempt can be found by its idempotency key."""
    lookup_by_reference: bool
    """An earlier attempt can be found by the merchant reference (``SUBSCRIPTION_ID:CYCLE``)."""
    idempotency_key_ttl_s: float | None = None
    """How long the provider remembers a key; None when it does not expire (or keys are unused)."""
    resend_only_after_2xx: bool = False
    """The provider stores a key's answer only after a 2xx (Checkout.com): after a 5xx or a
    timeout the same key is processed again, so an unknown attempt is never re-sent."""


class LookupResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a provider says of an earlier attempt."""

    found: bool
    result: ChargeResult | None = None
    """The attempt's outcome when found; None when the lookup itself failed."""
    anomaly: str | None = None
    """Set when what was found is not this attempt's (another key, amount or currency): never
    settled, it stays unknown for an operator."""


@runtime_checkable
class Provider(Protocol):
    """One configured payment provider connection.

    ``charge`` never raises for provider or transport trouble: it returns an
    outcome, and keeps "may have charged" (UNKNOWN) apart from "never sent"
    (PROVIDER_ERROR, RATE_LIMITED). ``lookup`` answers ``None`` when the
    provider could not be asked (it stays unknown, to be asked again).
    """

    name: str
    capabilities: Capabilities

    async def charge(self, request: AttemptRequest) -> ChargeResult: ...

    async def lookup(self, request: AttemptRequest) -> LookupResult | None: ...

    async def close(self) -> None: ...


class ProviderFactory(Protocol):
    """What the ``payd.providers`` entry-point group points at: a class with these members."""

    config_type: type[ProviderConfig]

    def __call__(self, name: str, config: ProviderConfig) -> Provider: ...
