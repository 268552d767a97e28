"""The Adyen adapter: the client half (wire types and the mapping live in ``transform``).

One call per attempt: ``POST {base_url}/{api_version}/payments`` with the stored
card, ``shopperInteraction: ContAuth`` and ``recurringProcessingModel:
Subscription``, authenticated by ``X-API-Key`` and made idempotent by
``Idempotency-Key``. See docs/providers/adyen.md.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Final

import aiohttp
import msgspec

from daemon.config import ProviderConfig
from daemon.models import AttemptRequest, ChargeResult, Outcome
from daemon.providers.adyen import transform
from daemon.providers.base import Capabilities, LookupResult
from daemon.providers.http import HttpResponse, exchange, open_session
from daemon.secrets import Secret, require_secret

# Adyen: "Idempotency keys are valid for a minimum period of 7 days after first submission."
IDEMPOTENCY_KEY_TTL_S: Final = 7 * 24 * 3600.0


class AdyenProviderConfig(ProviderConfig, frozen=True, kw_only=True):
    merchant_account: Annotated[str, msgspec.Meta(min_length=1)]
    """The Adyen merchant account the payments are made on (``merchantAccount``)."""
    api_version: Annotated[str, msgspec.Meta(pattern=r"^v[0-9]{2,3}\Z")] = "v71"
    """Checkout API version, the first segment of the path: ``/v71/payments``."""
    credential_name: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,62}\Z")] = "adyen_api_key"
    """Name of the secret holding the API key (``PAYD_<NAME>`` or ``$CREDENTIALS_DIRECTORY/<name>``)."""
    return_url: Annotated[str, msgspec.Meta(pattern=r"^https?://", max_length=1024)] = (
        transform.DEFAULT_RETURN_URL
    )
    """Sent as ``returnUrl``, which Adyen requires on every payment; a ContAuth charge never uses it."""


class AdyenProvider:
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
        api_key = require_secret(config.credential_name, needed_by=f"providers.{name} (the Adyen API key)")
        self.name = name
        self._api_key: Secret = api_key
        self._merchant_account = config.merchant_account
        self._path = f"{config.api_version}/payments"
        self._return_url = config.return_url
        self._session: aiohttp.ClientSession = open_session(config)

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        problem = transform.shopper_reference_problem(request)
        if problem is not None:
            return ChargeResult(
                outcome=Outcome.PROVIDER_ERROR,
                retryable=False,
                decline_code="invalid_request",
                reason=f"not sent: {problem}",
            )
        headers = {
            "X-API-Key": self._api_key.reveal(),
            "Idempotency-Key": transform.idempotency_key(self._merchant_account, request.idempotency_key),
            "Content-Type": "application/json",
        }
        answer = await exchange(
            self._session,
            "POST",
            self._path,
            body=transform.payment_body(request, self._merchant_account, self._return_url),
            headers=headers,
        )
        if isinstance(answer, HttpResponse):
            return transform.charge_result(
                answer.status,
                answer.headers,
                answer.body,
                reference=transform.payment_reference(request),
                amount=transform.Amount(value=request.amount_minor, currency=request.currency),
            )
        return answer

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        """Adyen cannot be asked: the Checkout API reads no payment by key or reference.

        Its answer reaches merchants by webhook (which payd does not consume) or by
        re-sending the same request under the same ``Idempotency-Key``, which returns
        the stored answer instead of charging again for at least 7 days.
        """
        del request
        return None

    async def close(self) -> None:
        await self._session.close()

    def __repr__(self) -> str:
        return f"AdyenProvider(name={self.name!r}, merchant_account={self._merchant_account!r})"
