"""The provider interface every adapter implements, its configuration base and capabilities.

This module imports nothing of payd but the domain values (``daemon.models``):
the configuration loader imports it, so it must never import the loader back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, ClassVar, Protocol, runtime_checkable

import msgspec

from daemon.models import AttemptRequest, ChargeResult, ReversalOperation, ReversalRequest

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
SecretName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,62}\Z")]
"""The name of a secret (never its value): ``PAYD_<NAME>`` or ``$CREDENTIALS_DIRECTORY/<name>``."""


class ProviderConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Keys every provider has. A provider kind subclasses this with its own keys.

    A kind that renames a key lists ``old: new`` in ``renamed_keys`` and keeps the old
    key as a field defaulting to None for one release: a table using it still loads,
    ``deprecated_keys`` names it for a warning, and giving both spellings is an error.
    """

    kind: str
    base_url: str
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=100000)]
    timeout_s: PositiveFloat = 10.0
    connect_timeout_s: PositiveFloat = 2.0
    slot_hold_s: NonNegativeFloat = 30.0
    """A call payd gave up on (timeout, connection lost) keeps its ``max_in_flight`` slot this
    much longer: the provider may still be working on it. 0 frees it at once."""
    max_tries: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    """Tries per attempt for provider errors that charged nothing."""
    retry_backoff_s: PositiveFloat = 0.5
    max_rate_limited_tries: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    """Tries per attempt answered 429; each waits the provider's Retry-After (the whole lane pauses)."""
    rate_per_s: PositiveFloat | None = None
    """Calls per second this instance may start; unset: no local rate limit."""
    fleet_rate_per_s: PositiveFloat | None = None
    """Calls per second all instances together may start, enforced through Redis."""
    fallback_rate_per_s: PositiveFloat | None = None
    """Per-instance rate while Redis is unreachable; default a quarter of fleet_rate_per_s."""
    burst: PositiveFloat | None = None
    """Calls that may start at once after a quiet spell; default one second's worth of rate."""
    breaker_failure_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    breaker_min_calls: Annotated[int, msgspec.Meta(ge=1)] = 20
    breaker_window_s: PositiveFloat = 10.0
    breaker_open_s: PositiveFloat = 5.0
    breaker_max_open_s: PositiveFloat = 60.0
    breaker_probes: Annotated[int, msgspec.Meta(ge=1)] = 3
    failover_to: str | None = None
    """Another provider of the same kind to send to when this one was never reached: its breaker
    is open, or it cannot be connected to. Only where payment methods are valid at both."""

    renamed_keys: ClassVar[Mapping[str, str]] = {}
    """Old spelling -> new spelling, for keys renamed in this release."""

    def __post_init__(self) -> None:
        # Runs once per configuration load, never per attempt.
        if not self.renamed_keys:
            return
        defaults = {field.name: field.default for field in msgspec.structs.fields(self)}
        for old, new in self.renamed_keys.items():
            value = getattr(self, old)
            if value is None:
                continue
            if getattr(self, new) != defaults[new]:
                raise ValueError(f"{old} is the old name of {new}: give only {new}")
            msgspec.structs.force_setattr(self, new, value)

    def deprecated_keys(self) -> list[str]:
        """The old spellings this table used, each with its new name, for a warning."""
        return [
            f"{old} is now {new}" for old, new in self.renamed_keys.items() if getattr(self, old) is not None
        ]


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
    refunds: bool = False
    """The adapter implements ``refund`` and ``lookup_refund`` (``RefundingProvider``); a refund
    to a provider without it is refused, never sent."""
    refund_lookup: bool = True
    """``lookup_refund`` can find a refund by its key. False (Adyen, iyzico): it always answers
    "could not ask", and an unknown refund is re-sent under its key where the provider honours
    keys (within their lifetime), else left to the provider's notification or an operator."""


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


@runtime_checkable
class RefundingProvider(Provider, Protocol):
    """A provider that can reverse its charges (``Capabilities.refunds``).

    ``refund`` keeps "may have refunded" (UNKNOWN) apart from "never sent" as
    ``charge`` does; ``lookup_refund`` finds a refund by its idempotency key, or
    answers None when the provider could not be asked.
    """

    async def refund(self, request: ReversalRequest) -> ChargeResult: ...

    async def lookup_refund(self, request: ReversalRequest) -> LookupResult | None: ...


@runtime_checkable
class VoidingProvider(Protocol):
    """A refunding provider that can also cancel a charge before settlement (a void)."""

    def reversal_operation(self, request: ReversalRequest) -> ReversalOperation:
        """Refund or void for this reversal, from what ``request`` says of the charge (its amount,
        when it was charged). Called once, at the claim; the choice is stored with the reversal."""
        ...


def reversal_operation(provider: Provider, request: ReversalRequest) -> ReversalOperation:
    """The adapter's choice for ``request``; a void only ever for the whole charge."""
    if not isinstance(provider, VoidingProvider):
        return ReversalOperation.REFUND
    chosen = provider.reversal_operation(request)
    if chosen is ReversalOperation.VOID and request.amount_minor != request.charge_amount_minor:
        return ReversalOperation.REFUND
    return chosen


class ReversalNotice(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one reversal as its provider reported it by notification (a webhook)."""

    operation: ReversalOperation
    provider_ref: str | None
    """The provider's id of the reversal (Adyen: the modification's ``pspReference``)."""
    idempotency_key: str | None
    """payd's key of the reversal, where the provider echoes what payd sent as its reference."""
    key_digest: str | None = None
    """The SHA-256 (lowercase hex) of payd's key, where payd had to send a shortened reference
    made of it (the adapter knows its own shortening); storage matches it by ``key_sha256``."""
    original_provider_ref: str | None = None
    """The provider's id of the charge reversed."""
    amount_minor: int | None = None
    currency: str | None = None
    result: ChargeResult
    """APPROVED (it succeeded) or a decline/error (it failed): never UNKNOWN."""


class Notifications(msgspec.Struct, frozen=True, kw_only=True):
    """A verified notification request: the reversal outcomes in it and the answer it expects."""

    notices: list[ReversalNotice]
    ignored: int = 0
    """Items of no concern to reversals (other event codes): acknowledged, nothing done."""
    answer: bytes = b""
    content_type: str = "text/plain"


class NotificationRefused(msgspec.Struct, frozen=True, kw_only=True):
    """A notification request that must not be believed or cannot be read: nothing is done."""

    status: int
    kind: str
    """A short label for the metric: ``bad_signature``, ``malformed``, ``not_configured``."""
    reason: str


@runtime_checkable
class NotifiedProvider(Protocol):
    """A provider that reports reversal outcomes by notification to ``POST /webhooks/{name}``."""

    name: str

    def read_notification(
        self, body: bytes, headers: Mapping[str, str]
    ) -> Notifications | NotificationRefused:
        """Verify (signature) and read one notification request; never raises for bad input."""
        ...


def refunding(provider: Provider) -> RefundingProvider | None:
    """The provider as a ``RefundingProvider`` when it says it can refund, else None."""
    if provider.capabilities.refunds and isinstance(provider, RefundingProvider):
        return provider
    return None


class ProviderFactory(Protocol):
    """What the ``payd.providers`` entry-point group points at: a class with these members."""

    config_type: type[ProviderConfig]

    def __call__(self, name: str, config: ProviderConfig) -> Provider: ...
