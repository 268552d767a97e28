"""The iyzico adapter: the client half (wire types, signature and mapping live in ``transform``).

iyzico honours no idempotency key, so this adapter never relies on one: an
answer that may follow a payment is UNKNOWN, and the reconciler looks it up by
conversationId (which carries payd's idempotency key) instead of sending again.

Reversals: a refund by ``paymentId`` (``/v2/payment/refund``), or, for the whole
charge on the day it was made (Turkey time), a cancel (``/payment/cancel``), which
leaves no trace on the card statement. iyzico keeps no key and has no read of a
refund, so a reversal whose answer is lost is parked for an operator, never re-sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, ClassVar, Final, Literal

import msgspec

from daemon.providers.api import (
    AttemptRequest,
    Capabilities,
    ChargeResult,
    HttpAdapter,
    HttpResponse,
    LookupResult,
    Outcome,
    ProviderConfig,
    ReversalOperation,
    ReversalRequest,
    Secret,
    SecretName,
    require_secret,
)
from daemon.providers.iyzico import transform

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

TURKEY: Final = timezone(timedelta(hours=3), "TRT")
"""Turkey keeps UTC+3 all year (since 2016): the banks' day, which decides whether a cancel works."""


class IyzicoProviderConfig(ProviderConfig, frozen=True):
    """``[providers.NAME]`` keys of kind ``iyzico``; the API keys are secrets, never here."""

    secret_name: SecretName = "iyzico_api_key"  # noqa: S105 -- the secret's name, not its value
    """Name of the secret holding the API key: ``PAYD_<NAME>`` or a credential file."""
    signing_secret_name: SecretName = "iyzico_secret_key"  # noqa: S105 -- likewise a name
    """Name of the secret holding the secret key that signs every request."""
    api_key_secret: SecretName | None = None
    """Deprecated spelling of ``secret_name``, accepted for one release."""
    secret_key_secret: SecretName | None = None
    """Deprecated spelling of ``signing_secret_name``, accepted for one release."""
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
    cancel_until_hour: Annotated[int, msgspec.Meta(ge=0, le=24)] = 22
    """A reversal of the whole charge on the day it was made (Turkey time) is a cancel until this
    hour, local; later, or another day, a refund. 0: never cancel."""
    lookup_not_found_error_codes: tuple[str, ...] = ()
    """errorCodes of a ``/payment/detail`` failure that mean "no such payment". Empty (the
    default) means payd never concludes an attempt was not received: it stays unknown."""

    renamed_keys: ClassVar[Mapping[str, str]] = {
        "api_key_secret": "secret_name",
        "secret_key_secret": "signing_secret_name",
    }


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


# What a charge hands from its request to its answer: the body, and what the answer must echo.
_Prepared = tuple[bytes, transform.Expected]


class IyzicoProvider(HttpAdapter[_Prepared]):
    config_type: ClassVar[type[ProviderConfig]] = IyzicoProviderConfig
    # No idempotency keys at iyzico: the reconciler must never send an attempt again, only
    # look it up, which works by conversationId (= payd's idempotency key).
    capabilities: Capabilities = Capabilities(
        honours_idempotency_key=False,
        lookup_by_key=True,
        lookup_by_reference=False,
        refunds=True,
        refund_lookup=False,
    )

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, IyzicoProviderConfig)
        # Secrets first: a missing one fails here, before a session exists to leak.
        self._api_key = _secret(name, config.secret_name)
        self._secret_key = _secret(name, config.signing_secret_name)
        super().__init__(name, config, charge_path=transform.PAYMENT_PATH)
        self._defaults = _defaults(config)
        self._not_found_codes = frozenset(config.lookup_not_found_error_codes)
        self._cancel_until_hour = config.cancel_until_hour
        self._ip = config.buyer_ip

    def prepare_charge(self, request: AttemptRequest) -> _Prepared | ChargeResult:
        prepared = transform.payment_body(request, self._defaults)
        if isinstance(prepared, transform.Refused):
            return prepared.result  # never sent
        return prepared

    def charge_body(self, prepared: _Prepared) -> bytes:
        return prepared[0]

    def charge_headers(self, request: AttemptRequest, body: bytes) -> Mapping[str, str]:
        return self._signed_headers(self.charge_path, body)

    def charge_result(
        self, request: AttemptRequest, prepared: _Prepared, response: HttpResponse
    ) -> ChargeResult:
        return transform.charge_result(
            response.status, response.headers, response.body, prepared[1], self._secret_key.reveal()
        )

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        prepared = transform.payment_body(request, self._defaults)
        if isinstance(prepared, transform.Refused):
            return LookupResult(found=False)  # such an attempt is never sent
        _, expected = prepared
        path = transform.DETAIL_PATH
        body = transform.detail_body(request, self._defaults.locale, getattr(request, "provider_ref", None))
        answer = await self.send("POST", path, body=body, headers=self._signed_headers(path, body))
        if answer is None:
            return None
        return transform.lookup_result(
            answer.status, answer.body, expected, self._not_found_codes, self._secret_key.reveal()
        )

    # -- reversals --------------------------------------------------------------------------

    def reversal_operation(self, request: ReversalRequest) -> ReversalOperation:
        """A cancel for a charge made today (Turkey time) before ``cancel_until_hour``, else a refund."""
        if request.charged_at is None:
            return ReversalOperation.REFUND
        now = datetime.now(UTC).astimezone(TURKEY)
        same_day = request.charged_at.astimezone(TURKEY).date() == now.date()
        return (
            ReversalOperation.VOID
            if same_day and now.hour < self._cancel_until_hour
            else ReversalOperation.REFUND
        )

    def refund_path(self, request: ReversalRequest) -> str:
        return transform.CANCEL_PATH if request.operation is ReversalOperation.VOID else transform.REFUND_PATH

    def refund_body(self, request: ReversalRequest) -> bytes:
        payment_id = request.original_provider_ref or ""
        locale = self._defaults.locale
        if request.operation is ReversalOperation.VOID:
            return transform.cancel_body(
                locale=locale, conversation_id=request.idempotency_key, payment_id=payment_id, ip=self._ip
            )
        return transform.refund_body(
            locale=locale,
            conversation_id=request.idempotency_key,
            payment_id=payment_id,
            price=transform.format_price(request.amount_minor, request.currency) or "",
            currency=request.currency,
            ip=self._ip,
        )

    def refund_headers(self, request: ReversalRequest, body: bytes) -> Mapping[str, str]:
        return self._signed_headers(self.refund_path(request), body)

    def refund_result(self, request: ReversalRequest, response: HttpResponse) -> ChargeResult:
        price = transform.format_price(request.amount_minor, request.currency)
        expected = transform.ExpectedReversal(
            conversation_id=request.idempotency_key,
            payment_id=request.original_provider_ref or "",
            price=None if request.operation is ReversalOperation.VOID or price is None else Decimal(price),
            currency=request.currency,
        )
        return transform.reversal_result(response.status, response.headers, response.body, expected)

    async def refund(self, request: ReversalRequest) -> ChargeResult:
        problem = None
        if not request.original_provider_ref:
            problem = "the charge has no iyzico paymentId"
        elif transform.format_price(request.amount_minor, request.currency) is None:
            problem = f"iyzico takes no {request.currency}"
        if problem is not None:
            return ChargeResult(
                outcome=Outcome.PROVIDER_ERROR,
                retryable=False,
                decline_code="invalid_request",
                reason=f"not sent: {problem}",
            )
        result = await super().refund(request)
        if result.outcome is Outcome.UNKNOWN and not result.needs_operator:
            return transform.operator_unknown(result)  # a lost answer: no key, no lookup
        return result

    async def lookup_refund(self, request: ReversalRequest) -> LookupResult | None:
        """iyzico has no read of a refund or cancel: an unknown one waits for an operator."""
        del request
        return None

    def _signed_headers(self, path: str, body: bytes) -> dict[str, str]:
        random_key = transform.random_key()
        return {
            "Authorization": transform.authorization(
                self._api_key.reveal(), self._secret_key.reveal(), random_key, path, body
            ),
            "x-iyzi-rnd": random_key,
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
