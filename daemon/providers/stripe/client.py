"""The Stripe adapter: the client half (wire types and the mapping live in ``transform``).

A renewal is one ``POST /v1/payment_intents`` that creates and confirms an off-session
PaymentIntent on the customer's saved payment method, under payd's idempotency key.
A lookup lists the customer's PaymentIntents (Stripe's list APIs are read-after-write
consistent) and falls back to the Search API for attempts older than the pages it reads.

A refund is one ``POST /v1/refunds`` of the charge's PaymentIntent under the refund's own
idempotency key, which also travels in the refund's metadata; a refund lookup lists the
PaymentIntent's refunds (``GET /v1/refunds?payment_intent=``) and keeps the one carrying it.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Annotated, ClassVar, Final

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
    ReversalRequest,
    SecretName,
    require_secret,
)
from daemon.providers.stripe import transform

IDEMPOTENCY_KEY_TTL_S: Final = 24 * 3600.0  # Stripe prunes keys once they are 24 hours old

ApiVersion = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?\Z")]
PaymentMethodType = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]*\Z")]


class StripeProviderConfig(ProviderConfig, frozen=True):
    api_version: ApiVersion = transform.DEFAULT_API_VERSION
    """Sent as ``Stripe-Version`` on every request, so payd never runs on the account's default."""
    secret_name: SecretName = "stripe_api_key"  # noqa: S105 -- the name of a secret, not one
    """The secret holding the secret (or restricted) API key: ``PAYD_STRIPE_API_KEY`` or a
    credential file of that name. One per Stripe account when several are configured."""
    payment_method_types: tuple[PaymentMethodType, ...] = ("card",)
    """Sent as ``payment_method_types[]``; empty: the Dashboard's payment method settings."""
    description_prefix: Annotated[str, msgspec.Meta(max_length=200)] = "payd"
    """The PaymentIntent ``description`` is this, a space, and the merchant reference."""
    lookup_page_size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 100
    """PaymentIntents per list page when a lookup reads the customer's payments."""
    lookup_max_pages: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    """List pages a lookup reads before it asks the Search API instead."""


class _Headers(dict[str, str]):
    """Request headers whose repr shows only the names: one of them holds the API key."""

    def __repr__(self) -> str:
        return f"_Headers({sorted(self)})"

    __str__ = __repr__


class StripeProvider(HttpAdapter[bytes]):
    config_type: ClassVar[type[ProviderConfig]] = StripeProviderConfig
    capabilities: Capabilities = Capabilities(
        honours_idempotency_key=True,
        lookup_by_key=True,
        lookup_by_reference=False,
        idempotency_key_ttl_s=IDEMPOTENCY_KEY_TTL_S,
        refunds=True,
    )

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, StripeProviderConfig)
        secret = require_secret(config.secret_name, needed_by=f"providers.{name} (the Stripe API key)")
        super().__init__(name, config, charge_path="v1/payment_intents")
        self._config = config
        read = _Headers({"Authorization": f"Bearer {secret.reveal()}", "Stripe-Version": config.api_version})
        self._read_headers = read

    def prepare_charge(self, request: AttemptRequest) -> bytes | ChargeResult:
        problem = transform.request_problem(request)
        if problem is not None:
            return ChargeResult(
                outcome=Outcome.PROVIDER_ERROR, retryable=False, reason=f"not sent: {problem}"
            )
        return transform.payment_intent_form(
            request,
            payment_method_types=self._config.payment_method_types,
            description_prefix=self._config.description_prefix,
        )

    def charge_headers(self, request: AttemptRequest, body: bytes) -> Mapping[str, str]:
        headers = _Headers(self._read_headers)
        headers["Idempotency-Key"] = request.idempotency_key
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return headers

    def charge_result(self, request: AttemptRequest, prepared: bytes, response: HttpResponse) -> ChargeResult:
        return transform.charge_result(response.status, response.headers, response.body)

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        key = request.idempotency_key
        if request.customer_ref is not None:
            listed = await self._list_customer(request.customer_ref, key)
            if listed is None:
                return None
            matches, complete = listed
            if matches or complete:
                return transform.lookup_result(matches, request)
        page = await self._get(
            "v1/payment_intents/search", {"query": transform.search_query(key), "limit": "100"}
        )
        if page is None:
            return None
        # Search trails writes by up to a minute (longer in an outage), so "not found" here
        # is not proof; payd resends under the same key, which Stripe answers from its
        # idempotency store for 24 hours, so a late-indexed payment is never charged twice.
        return transform.search_lookup_result(page, request)

    # -- refunds ----------------------------------------------------------------------------

    def refund_problem(self, request: ReversalRequest) -> str | None:
        return transform.refund_problem(request)

    def refund_path(self, request: ReversalRequest) -> str:
        return "v1/refunds"

    def refund_body(self, request: ReversalRequest) -> bytes:
        return transform.refund_form(request)

    def refund_headers(self, request: ReversalRequest, body: bytes) -> Mapping[str, str]:
        headers = _Headers(self._read_headers)
        headers["Idempotency-Key"] = request.idempotency_key
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return headers

    def refund_result(self, request: ReversalRequest, response: HttpResponse) -> ChargeResult:
        return transform.refund_result(request, response.status, response.headers, response.body)

    async def lookup_refund(self, request: ReversalRequest) -> LookupResult | None:
        """The charge's refunds, newest first, read page by page for the one carrying the key.
        Stripe's list endpoints are read-after-write consistent, so "not found" after every
        page is read means Stripe executed no refund under the key."""
        ref = request.original_provider_ref
        if transform.refund_problem(request) is not None or ref is None:
            return None  # never sent (refund() refuses it), so never unknown
        target = "charge" if ref.startswith("ch_") else "payment_intent"
        params = {target: ref, "limit": str(self._config.lookup_page_size)}
        seen: list[transform.Refund] = []
        for _ in range(self._config.lookup_max_pages):
            query = urllib.parse.urlencode(params)
            answer = await self.send("GET", f"v1/refunds?{query}", headers=self._read_headers)
            if answer is None or answer.status != 200:
                return None
            page = transform.decode_refund_page(answer.body)
            if page is None:
                return None
            seen.extend(page.data)
            found = transform.refund_lookup_result(seen, request)
            if found.found or not page.has_more or not page.data:
                return found
            params["starting_after"] = page.data[-1].id
        return None  # more refunds than the pages read: ask again later

    async def _list_customer(
        self, customer: str, key: str
    ) -> tuple[list[transform.PaymentIntent], bool] | None:
        """The customer's PaymentIntents carrying ``key``, newest pages first, and whether
        every page was read; None when Stripe could not be asked."""
        params = {"customer": customer, "limit": str(self._config.lookup_page_size)}
        for _ in range(self._config.lookup_max_pages):
            page = await self._get("v1/payment_intents", params)
            if page is None:
                return None
            matches = transform.matching(page.data, key)
            if matches or not page.has_more or not page.data:
                return matches, not page.has_more
            params["starting_after"] = page.data[-1].id
        return [], False

    async def _get(self, path: str, params: dict[str, str]) -> transform.PaymentIntentPage | None:
        query = urllib.parse.urlencode(params)
        answer = await self.send("GET", f"{path}?{query}", headers=self._read_headers)
        if answer is None or answer.status != 200:
            return None
        return transform.decode_page(answer.body)
