"""The iyzico adapter: the client half (wire types, signature and mapping live in ``transform``).

iyzico honours no idempotency key, so this adapter never relies on one: an
answer that may follow a payment is UNKNOWN, and the reconciler looks it up by
conversationId (which carries payd's idempotency key) instead of sending again.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import aiohttp
import msgspec

from daemon.config import ProviderConfig
from daemon.models import AttemptRequest, ChargeResult
from daemon.providers.base import Capabilities, LookupResult
from daemon.providers.http import HttpResponse, exchange, open_session
from daemon.providers.iyzico import transform
from daemon.secrets import Secret, require_secret

PaymentChannel = Literal[
    "WEB",
    "MOBILE",
    "MOBILE_WEB",
    "MOBILE_IOS",
    "MOBILE_ANDROID",
    "MOBILE_WINDOWS",
    "MOBILE_TABLET",
    "MOBILE_PHONE",
]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
SecretName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,62}\Z")]


class IyzicoProviderConfig(ProviderConfig, frozen=True):
    """``[providers.NAME]`` keys of kind ``iyzico``; the API keys are secrets, never here."""

    api_key_secret: SecretName = "iyzico_api_key"  # noqa: S105 -- the secret's name, not its value
    """Name of the secret holding the API key: ``PAYD_<NAME>`` or a credential file."""
    secret_key_secret: SecretName = "iyzico_secret_key"  # noqa: S105 -- likewise a name
    """Name of the secret holding the secret key that signs every request."""
    locale: Literal["tr", "en"] = "en"
    payment_channel: PaymentChannel = "WEB"
    payment_group: Literal["PRODUCT", "LISTING", "SUBSCRIPTION"] = "SUBSCRIPTION"
    basket_item_name: Text = "Subscription"
    basket_item_category: Text = "Subscription"
    # Buyer placeholders iyzico requires; an attempt's metadata ``buyer_<field>`` overrides each.
    buyer_name: Text = "Subscriber"
    buyer_surname: Text = "Customer"
    buyer_identity_number: Text = "11111111111"
    buyer_email: Text = "subscriber@example.com"
    buyer_address: Text = "Not provided"
    buyer_city: Text = "Istanbul"
    buyer_country: Text = "Turkey"
    buyer_ip: Text = "127.0.0.1"
    lookup_not_found_error_codes: tuple[str, ...] = ()
    """errorCodes of a ``/payment/detail`` failure that mean "no such payment". Empty (the
    default) means payd never concludes an attempt was not received: it stays unknown."""


def _secret(provider: str, name: str) -> Secret:
    return require_secret(name, needed_by=f"providers.{provider}")


def _defaults(config: IyzicoProviderConfig) -> transform.PaymentDefaults:
    buyer = {field: getattr(config, f"buyer_{field}") for field in transform.BUYER_FIELDS}
    return transform.PaymentDefaults(
        locale=config.locale,
        payment_channel=config.payment_channel,
        payment_group=config.payment_group,
        basket_item_name=config.basket_item_name,
        basket_item_category=config.basket_item_category,
        buyer=buyer,
    )


class IyzicoProvider:
    config_type: ClassVar[type[ProviderConfig]] = IyzicoProviderConfig
    # No idempotency keys at iyzico: the reconciler must never send an attempt again, only
    # look it up, which works by conversationId (= payd's idempotency key).
    capabilities: Capabilities = Capabilities(
        honours_idempotency_key=False, lookup_by_key=True, lookup_by_reference=False
    )

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, IyzicoProviderConfig)
        self.name = name
        # Secrets first: a missing one fails here, before a session exists to leak.
        self._api_key = _secret(name, config.api_key_secret)
        self._secret_key = _secret(name, config.secret_key_secret)
        self._defaults = _defaults(config)
        self._not_found_codes = frozenset(config.lookup_not_found_error_codes)
        self._session: aiohttp.ClientSession = open_session(config)

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        prepared = transform.payment_body(request, self._defaults)
        if isinstance(prepared, transform.Refused):
            return prepared.result  # never sent
        body, expected = prepared
        answer = await self._post(transform.PAYMENT_PATH, body)
        if isinstance(answer, HttpResponse):
            return transform.charge_result(
                answer.status, answer.headers, answer.body, expected, self._secret_key.reveal()
            )
        return answer

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        prepared = transform.payment_body(request, self._defaults)
        if isinstance(prepared, transform.Refused):
            return LookupResult(found=False)  # such an attempt is never sent
        _, expected = prepared
        answer = await self._post(
            transform.DETAIL_PATH,
            transform.detail_body(request, self._defaults.locale, getattr(request, "provider_ref", None)),
        )
        if not isinstance(answer, HttpResponse):
            return None
        return transform.lookup_result(
            answer.status, answer.body, expected, self._not_found_codes, self._secret_key.reveal()
        )

    async def _post(self, path: str, body: bytes) -> HttpResponse | ChargeResult:
        random_key = transform.random_key()
        headers = {
            "Authorization": transform.authorization(
                self._api_key.reveal(), self._secret_key.reveal(), random_key, path, body
            ),
            "x-iyzi-rnd": random_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        return await exchange(self._session, "POST", path, body=body, headers=headers)

    async def close(self) -> None:
        await self._session.close()
