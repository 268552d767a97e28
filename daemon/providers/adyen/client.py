"""The Adyen adapter: the client half (wire types and the mapping live in ``transform``).

One call per attempt: ``POST {base_url}/{api_version}/payments`` with the stored
card, ``shopperInteraction: ContAuth`` and ``recurringProcessingModel:
Subscription``, authenticated by ``X-API-Key`` and made idempotent by
``Idempotency-Key``. See docs/providers/adyen.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, ClassVar, Final

import msgspec

from daemon.providers.adyen import transform
from daemon.providers.api import (
    AttemptRequest,
    Capabilities,
    ChargeResult,
    HttpAdapter,
    HttpResponse,
    LookupResult,
    Outcome,
    ProviderConfig,
    Secret,
    SecretName,
    require_secret,
)

# Adyen: "Idempotency keys are valid for a minimum period of 7 days after first submission."
IDEMPOTENCY_KEY_TTL_S: Final = 7 * 24 * 3600.0


class AdyenProviderConfig(ProviderConfig, frozen=True, kw_only=True):
    merchant_account: Annotated[str, msgspec.Meta(min_length=1)]
    """The Adyen merchant account the payments are made on (``merchantAccount``)."""
    api_version: Annotated[str, msgspec.Meta(pattern=r"^v[0-9]{2,3}\Z")] = "v71"
    """Checkout API version, the first segment of the path: ``/v71/payments``."""
    secret_name: SecretName = "adyen_api_key"  # noqa: S105 -- the secret's name, not its value
    """Name of the secret holding the API key (``PAYD_<NAME>`` or ``$CREDENTIALS_DIRECTORY/<name>``)."""
    credential_name: SecretName | None = None
    """Deprecated spelling of ``secret_name``, accepted for one release."""

    renamed_keys: ClassVar[Mapping[str, str]] = {"credential_name": "secret_name"}
    return_url: Annotated[str, msgspec.Meta(pattern=r"^https?://", max_length=1024)] = (
        transform.DEFAULT_RETURN_URL
    )
    """Sent as ``returnUrl``, which Adyen requires on every payment; a ContAuth charge never uses it."""


class AdyenProvider(HttpAdapter[bytes]):
    config_type: ClassVar[type[ProviderConfig]] = AdyenProviderConfig
    # Adyen has no read of a payment by idempotency key or by reference: an unknown
    # outcome can only be settled by re-sending under the same key while Adyen keeps it.
    capabilities: Capabilities = Capabilities(
        honours_idempotency_key=True,
        lookup_by_key=False,
        lookup_by_reference=False,
        idempotency_key_ttl_s=IDEMPOTENCY_KEY_TTL_S,
    )

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, AdyenProviderConfig)
        api_key = require_secret(config.secret_name, needed_by=f"providers.{name} (the Adyen API key)")
        super().__init__(name, config, charge_path=f"{config.api_version}/payments")
        self._api_key: Secret = api_key
        self._merchant_account = config.merchant_account
        self._return_url = config.return_url

    def prepare_charge(self, request: AttemptRequest) -> bytes | ChargeResult:
        problem = transform.shopper_reference_problem(request)
        if problem is not None:
            return ChargeResult(
                outcome=Outcome.PROVIDER_ERROR,
                retryable=False,
                decline_code="invalid_request",
                reason=f"not sent: {problem}",
            )
        return transform.payment_body(request, self._merchant_account, self._return_url)

    def charge_headers(self, request: AttemptRequest, body: bytes) -> Mapping[str, str]:
        return {
            "X-API-Key": self._api_key.reveal(),
            "Idempotency-Key": transform.idempotency_key(self._merchant_account, request.idempotency_key),
            "Content-Type": "application/json",
        }

    def charge_result(self, request: AttemptRequest, prepared: bytes, response: HttpResponse) -> ChargeResult:
        return transform.charge_result(
            response.status,
            response.headers,
            response.body,
            reference=transform.payment_reference(request),
            amount=transform.Amount(value=request.amount_minor, currency=request.currency),
        )

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        """Adyen cannot be asked: the Checkout API reads no payment by key or reference.

        Its answer reaches merchants by webhook (which payd does not consume) or by
        re-sending the same request under the same ``Idempotency-Key``, which returns
        the stored answer instead of charging again for at least 7 days.
        """
        del request
        return None

    def __repr__(self) -> str:
        return f"AdyenProvider(name={self.name!r}, merchant_account={self._merchant_account!r})"
