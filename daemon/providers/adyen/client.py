"""The Adyen adapter: the client half (wire types and the mapping live in ``transform``).

One call per attempt: ``POST {base_url}/{api_version}/payments`` with the stored
card, ``shopperInteraction: ContAuth`` and ``recurringProcessingModel:
Subscription``, authenticated by ``X-API-Key`` and made idempotent by
``Idempotency-Key``. See docs/providers/adyen.md.

Reversals: ``POST .../payments/{pspReference}/refunds`` (any part of a captured
payment) or ``.../cancels`` (a void: the whole payment, before capture, which
only a ``capture_delay_hours`` configuration leaves time for). Both answer
``received``: the reversal is pending until Adyen's REFUND or CANCELLATION
notification reaches ``POST /webhooks/{name}`` (``read_notification``), signed
with the HMAC key in the secret ``hmac_secret_name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Final

import msgspec
import structlog

from daemon.providers.adyen import transform
from daemon.providers.api import (
    AttemptRequest,
    Capabilities,
    ChargeResult,
    ConfigError,
    HttpAdapter,
    HttpResponse,
    LookupResult,
    NotificationRefused,
    Notifications,
    Outcome,
    ProviderConfig,
    ReversalNotice,
    ReversalOperation,
    ReversalRequest,
    Secret,
    SecretName,
    load_secret,
    require_secret,
)

log = structlog.get_logger("payd.providers.adyen")

# Adyen: "Idempotency keys are valid for a minimum period of 7 days after first submission."
IDEMPOTENCY_KEY_TTL_S: Final = 7 * 24 * 3600.0
VOID_MARGIN_S: Final = 3600.0
"""A void is chosen only while the capture is at least this far off (a quarter of the delay
when that is shorter): a cancel that arrives after the capture fails, and needs a refund."""


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
    hmac_secret_name: SecretName = "adyen_hmac_key"  # noqa: S105 -- the secret's name, not its value
    """Name of the secret holding the webhook HMAC key (hex, from Adyen's Customer Area) that
    signs REFUND/CANCELLATION notifications. Unset: notifications are refused, refunds stay pending."""
    webhook_basic_auth_secret_name: SecretName | None = None
    """Name of a secret holding ``USERNAME:PASSWORD``: when set, a notification must also carry
    that HTTP basic authentication (Adyen's webhook setting), or it is refused (401)."""
    capture_delay_hours: Annotated[int, msgspec.Meta(ge=1, le=672)] | None = None
    """Sent as ``captureDelayHours``: Adyen captures each payment this long after authorising it,
    and until shortly before then a full reversal is a cancel (a void) instead of a refund.
    Unset (the default): captured at once, every reversal is a refund."""


class AdyenProvider(HttpAdapter[bytes]):
    config_type: ClassVar[type[ProviderConfig]] = AdyenProviderConfig
    # Adyen has no read of a payment by idempotency key or by reference: an unknown
    # outcome can only be settled by re-sending under the same key while Adyen keeps it.
    capabilities: Capabilities = Capabilities(
        honours_idempotency_key=True,
        lookup_by_key=False,
        lookup_by_reference=False,
        idempotency_key_ttl_s=IDEMPOTENCY_KEY_TTL_S,
        refunds=True,
        refund_lookup=False,
    )

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, AdyenProviderConfig)
        api_key = require_secret(config.secret_name, needed_by=f"providers.{name} (the Adyen API key)")
        hmac_key = _hmac_key(name, config.hmac_secret_name)  # secrets first: no session to leak
        basic_auth = (
            require_secret(
                config.webhook_basic_auth_secret_name, needed_by=f"providers.{name} (webhook basic auth)"
            )
            if config.webhook_basic_auth_secret_name
            else None
        )
        super().__init__(name, config, charge_path=f"{config.api_version}/payments")
        self._api_key: Secret = api_key
        self._merchant_account = config.merchant_account
        self._return_url = config.return_url
        self._capture_delay_hours = config.capture_delay_hours
        self._api_version = config.api_version
        self._hmac_key = hmac_key
        self._basic_auth = basic_auth

    def prepare_charge(self, request: AttemptRequest) -> bytes | ChargeResult:
        problem = transform.shopper_reference_problem(request)
        if problem is not None:
            return ChargeResult(
                outcome=Outcome.PROVIDER_ERROR,
                retryable=False,
                decline_code="invalid_request",
                reason=f"not sent: {problem}",
            )
        return transform.payment_body(
            request, self._merchant_account, self._return_url, self._capture_delay_hours
        )

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

    # -- reversals --------------------------------------------------------------------------

    def reversal_operation(self, request: ReversalRequest) -> ReversalOperation:
        """A cancel while the payment is surely not captured yet (``capture_delay_hours``), else
        a refund. The pipeline asks only for whole-charge reversals to become voids."""
        if self._capture_delay_hours is None or request.charged_at is None:
            return ReversalOperation.REFUND
        delay_s = self._capture_delay_hours * 3600.0
        age_s = (datetime.now(UTC) - request.charged_at).total_seconds()
        if age_s < delay_s - min(VOID_MARGIN_S, delay_s / 4):
            return ReversalOperation.VOID
        return ReversalOperation.REFUND

    def refund_path(self, request: ReversalRequest) -> str:
        what = "cancels" if request.operation is ReversalOperation.VOID else "refunds"
        return f"{self._api_version}/payments/{request.original_provider_ref}/{what}"

    def refund_body(self, request: ReversalRequest) -> bytes:
        reference = transform.reversal_reference(request.idempotency_key)
        if request.operation is ReversalOperation.VOID:
            return transform.cancel_body(merchant_account=self._merchant_account, reference=reference)
        return transform.refund_body(
            amount=transform.Amount(value=request.amount_minor, currency=request.currency),
            merchant_account=self._merchant_account,
            reference=reference,
        )

    def refund_headers(self, request: ReversalRequest, body: bytes) -> Mapping[str, str]:
        return {
            "X-API-Key": self._api_key.reveal(),
            "Idempotency-Key": transform.idempotency_key(self._merchant_account, request.idempotency_key),
            "Content-Type": "application/json",
        }

    def refund_result(self, request: ReversalRequest, response: HttpResponse) -> ChargeResult:
        return transform.reversal_result(
            response.status,
            response.headers,
            response.body,
            reference=transform.reversal_reference(request.idempotency_key),
            payment_psp_reference=request.original_provider_ref or "",
        )

    async def refund(self, request: ReversalRequest) -> ChargeResult:
        if not request.original_provider_ref:
            return ChargeResult(
                outcome=Outcome.PROVIDER_ERROR,
                retryable=False,
                decline_code="no_psp_reference",
                reason="not sent: the charge has no Adyen pspReference to reverse",
            )
        return await super().refund(request)

    async def lookup_refund(self, request: ReversalRequest) -> LookupResult | None:
        """Adyen cannot be asked about a refund or cancel: its notification tells (or a resend
        under the same key, which replays ``received``)."""
        del request
        return None

    def read_notification(
        self, body: bytes, headers: Mapping[str, str]
    ) -> Notifications | NotificationRefused:
        """Every item must carry a valid ``hmacSignature``, or nothing in the request counts."""
        if self._basic_auth is not None and not transform.basic_auth_matches(
            headers.get("Authorization", ""), self._basic_auth.reveal()
        ):
            return NotificationRefused(
                status=401, kind="bad_credentials", reason="basic authentication missing or wrong"
            )
        if self._hmac_key is None:
            return NotificationRefused(
                status=503, kind="not_configured", reason="no HMAC key configured for these notifications"
            )
        items = transform.notification_items(body)
        if isinstance(items, str):
            return NotificationRefused(
                status=400, kind="malformed", reason=f"unreadable notification: {items}"
            )
        if not all(transform.signature_valid(item, self._hmac_key) for item in items):
            return NotificationRefused(
                status=401, kind="bad_signature", reason="an item's hmacSignature does not verify"
            )
        notices: list[ReversalNotice] = []
        ignored = 0
        for raw in items:
            item = transform.read_item(raw)
            if isinstance(item, str):
                return NotificationRefused(status=400, kind="malformed", reason=item)
            operation = transform.REVERSAL_EVENTS.get(item.event_code)
            if operation is None or item.merchant_account != self._merchant_account:
                ignored += 1
                continue
            notices.append(
                ReversalNotice(
                    operation=operation,
                    provider_ref=item.psp_reference,
                    idempotency_key=item.merchant_reference,
                    key_digest=transform.shortened_key_digest(item.merchant_reference),
                    original_provider_ref=item.original_reference,
                    amount_minor=item.amount.value if item.amount else None,
                    currency=item.amount.currency if item.amount else None,
                    result=transform.notice_result(item, operation),
                )
            )
        return Notifications(notices=notices, ignored=ignored, answer=transform.ACCEPTED_ANSWER)

    def __repr__(self) -> str:
        return f"AdyenProvider(name={self.name!r}, merchant_account={self._merchant_account!r})"


def _hmac_key(provider: str, secret_name: str) -> bytes | None:
    """The webhook HMAC key, or None (with a warning) when the secret is not set."""
    secret = load_secret(secret_name)
    if secret is None or not secret.reveal():
        log.warning(
            "adyen.no_hmac_key",
            provider=provider,
            secret=secret_name,
            effect="notifications are refused: refunds and cancels stay pending until settled by hand",
        )
        return None
    try:
        return transform.hmac_key_bytes(secret.reveal())
    except transform.HmacKeyError as error:
        raise ConfigError(f"providers.{provider}: secret {secret_name} ({secret.source}): {error}") from None
