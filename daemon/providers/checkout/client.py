"""The Checkout.com adapter: the client half (wire types and mapping live in ``transform``).

Charges are ``POST /payments`` of a stored source, merchant-initiated and
recurring, under ``Cko-Idempotency-Key``. Lookups list the payments made under
the attempt's reference (``GET /payments?reference=``) and keep the one whose
metadata carries the attempt's idempotency key, because dunning makes several
attempts under one reference (``SUBSCRIPTION_ID:CYCLE``).

Refunds are ``POST /payments/{id}/refunds`` under ``Cko-Idempotency-Key``, with the
refund's key as its ``reference``. Checkout.com accepts them with a 202 and processes them
asynchronously, so a refund is recorded unknown until a lookup reads its action
(``GET /payments/{id}/actions``, the ``Refund`` action with that reference). Payments are
always requested with ``capture: true``, so a void (which needs an authorized, not captured
payment) never applies: see docs/providers/checkout.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, ClassVar, Final
from urllib.parse import quote, urlencode

import msgspec

from daemon.providers.api import (
    AttemptRequest,
    Capabilities,
    ChargeResult,
    HttpAdapter,
    HttpResponse,
    LookupResult,
    PositiveFloat,
    ProviderConfig,
    ReversalRequest,
    Secret,
    SecretName,
    require_secret,
)
from daemon.providers.checkout import transform

_PAGE_SIZE: Final = 10
"""Payments per page of ``GET /payments`` (the documented example's limit)."""
_MAX_PAGES: Final = 10
"""More payments than this under one reference and the lookup gives up (asks again later)."""


class CheckoutProviderConfig(ProviderConfig, frozen=True, kw_only=True):
    processing_channel_id: Annotated[str, msgspec.Meta(pattern=r"^pc_[a-z0-9]+\Z")]
    """The processing channel every payment is made on (``pc_...``), from the Dashboard."""
    secret_name: SecretName = "checkout_api_key"  # noqa: S105 -- the secret's name, not its value
    """Name of the secret holding the secret API key (``sk_...``): ``PAYD_<NAME>`` or a credential file."""
    api_key_secret: SecretName | None = None
    """Deprecated spelling of ``secret_name``, accepted for one release."""
    idempotency_key_ttl_s: PositiveFloat = 86400.0
    """How long Checkout.com remembers a ``Cko-Idempotency-Key``: 24 h unless changed for the account."""

    renamed_keys: ClassVar[Mapping[str, str]] = {"api_key_secret": "secret_name"}


class CheckoutProvider(HttpAdapter[bytes]):
    config_type: ClassVar[type[ProviderConfig]] = CheckoutProviderConfig
    capabilities: Capabilities

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, CheckoutProviderConfig)
        secret = require_secret(
            config.secret_name, needed_by=f"providers.{name} (the Checkout.com secret key)"
        )
        super().__init__(name, config, charge_path="payments")
        # Keys live a day (or what the account has); a lookup by reference finds the rest.
        self.capabilities = Capabilities(
            honours_idempotency_key=True,
            lookup_by_key=False,
            lookup_by_reference=True,
            idempotency_key_ttl_s=config.idempotency_key_ttl_s,
            resend_only_after_2xx=True,  # "only cached after a 2xx": never re-sent after a 5xx
            refunds=True,
        )
        self._secret: Secret = secret
        self._channel = config.processing_channel_id

    def _authorization(self) -> dict[str, str]:
        # Built per call so the key sits in no long-lived structure but the Secret.
        return {"Authorization": "Bearer " + self._secret.reveal()}

    def prepare_charge(self, request: AttemptRequest) -> bytes:
        return transform.payment_request_body(request, processing_channel_id=self._channel)

    def charge_headers(self, request: AttemptRequest, body: bytes) -> Mapping[str, str]:
        headers = self._authorization()
        headers["Cko-Idempotency-Key"] = request.idempotency_key
        headers["Content-Type"] = "application/json"
        return headers

    def charge_result(self, request: AttemptRequest, prepared: bytes, response: HttpResponse) -> ChargeResult:
        return transform.charge_result(response.status, response.headers, response.body, request)

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        ours: list[transform.Payment] = []
        skip = 0
        for _ in range(_MAX_PAGES):
            query = urlencode({"reference": request.merchant_reference, "limit": _PAGE_SIZE, "skip": skip})
            page = await self._get_page(f"payments?{query}")
            if page is None:
                return None
            ours.extend(payment for payment in page.data if transform.belongs_to(payment, request))
            skip += len(page.data)
            if len(page.data) < _PAGE_SIZE or (page.total_count is not None and skip >= page.total_count):
                break
        else:
            return None  # too many payments under this reference to be sure; ask again later
        if not ours:
            return LookupResult(found=False)
        payment = transform.most_decisive(ours)
        if transform.needs_details(payment):
            details = await self._get_payment(payment.id)
            if details is None:
                return None
            payment = details
        return transform.lookup_result(payment, request)

    # -- refunds ----------------------------------------------------------------------------

    def refund_problem(self, request: ReversalRequest) -> str | None:
        return transform.refund_problem(request)

    def refund_path(self, request: ReversalRequest) -> str:
        assert request.original_provider_ref is not None  # refund() refuses it otherwise
        return f"payments/{quote(request.original_provider_ref, safe='')}/refunds"

    def refund_body(self, request: ReversalRequest) -> bytes:
        return transform.refund_request_body(request)

    def refund_headers(self, request: ReversalRequest, body: bytes) -> Mapping[str, str]:
        headers = self._authorization()
        headers["Cko-Idempotency-Key"] = request.idempotency_key
        headers["Content-Type"] = "application/json"
        return headers

    def refund_result(self, request: ReversalRequest, response: HttpResponse) -> ChargeResult:
        return transform.refund_result(request, response.status, response.headers, response.body)

    async def lookup_refund(self, request: ReversalRequest) -> LookupResult | None:
        if transform.refund_problem(request) is not None or request.original_provider_ref is None:
            return None  # never sent (refund() refuses it), so never unknown
        body = await self._get(f"payments/{quote(request.original_provider_ref, safe='')}/actions")
        actions = None if body is None else transform.decode_actions(body)
        if actions is None:
            return None
        return transform.refund_lookup_result(actions, request)

    async def _get(self, path: str) -> bytes | None:
        answer = await self.send("GET", path, headers=self._authorization())
        if answer is not None and answer.status == 200:
            return answer.body
        return None

    async def _get_page(self, path: str) -> transform.PaymentPage | None:
        body = await self._get(path)
        return None if body is None else transform.decode_page(body)

    async def _get_payment(self, payment_id: str) -> transform.Payment | None:
        body = await self._get(f"payments/{quote(payment_id, safe='')}")
        return None if body is None else transform.decode_payment(body)
