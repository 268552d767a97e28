"""A provider kind from a package of its own, written against ``daemon.providers.api`` alone.

Echo is a made-up provider with a tiny HTTP API (``testing.EchoFake`` plays it; nothing here
speaks for a real provider). The adapter implements the ``Provider`` protocol directly, without
``HttpAdapter``, sending through the API's ``exchange``, which classifies transport failures
(never sent / may have charged). ``tests/test_protections.py`` installs the package under the
entry point ``payd.providers: echo``; ``tests/test_conformance.py`` runs payd's adapter
conformance kit on it against its fake.

Echo's API, as its (made-up) documentation states it:

- ``POST /charges`` with ``Authorization: Bearer <key>``, ``Idempotency-Key`` and the JSON body
  ``{"amount_minor", "currency", "token", "reference", "note"}``. A key seen before answers the
  stored payment without charging again. Answers: ``200`` with a payment; ``429`` with
  ``Retry-After``; ``503 {"error": "not_processed"}``: nothing was processed.
- ``GET /charges/{key}``: ``200`` with the payment made under the key, or ``404``.
- A payment: ``{"id", "status", "amount_minor", "currency", "reference", "decline_code"}``,
  ``status`` one of ``STATUSES``; ``pending`` moves on to ``approved`` or ``declined`` by itself.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Final
from urllib.parse import quote

from daemon.providers.api import (
    AttemptRequest,
    Capabilities,
    ChargeResult,
    HttpResponse,
    LookupResult,
    Outcome,
    ProviderConfig,
    SecretName,
    exchange,
    open_session,
    require_secret,
    retry_after_seconds,
)

STATUSES: Final = ("approved", "declined", "pending")
"""Echo's payment statuses (all of them)."""
IN_PROGRESS: Final = frozenset({"pending"})
HARD_DECLINE_CODES: Final = frozenset({"stolen_card", "closed_account"})


class EchoConfig(ProviderConfig, frozen=True):
    greeting: str = "hi"
    """Sent as the payment's ``note``."""
    secret_name: SecretName = "echo_api_key"  # the secret's name, not its value


def payment_result(payment: dict[str, Any]) -> ChargeResult:
    """An Echo payment as an outcome."""
    status, ref = payment.get("status"), payment.get("id")
    if status == "approved":
        return ChargeResult(outcome=Outcome.APPROVED, provider_ref=ref)
    if status == "declined":
        code = payment.get("decline_code")
        hard = code in HARD_DECLINE_CODES
        return ChargeResult(
            outcome=Outcome.HARD_DECLINE if hard else Outcome.SOFT_DECLINE,
            provider_ref=ref,
            decline_code=code,
            retryable=not hard,
        )
    return ChargeResult(outcome=Outcome.UNKNOWN, provider_ref=ref, reason=f"payment status {status!r}")


def charge_result(response: HttpResponse) -> ChargeResult:
    try:
        body = json.loads(response.body)
    except ValueError:
        return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"unparseable {response.status} answer")
    if response.status == 200 and isinstance(body, dict):
        return payment_result(body)
    if response.status == 429:
        return ChargeResult(outcome=Outcome.RATE_LIMITED, retry_after_s=retry_after_seconds(response.headers))
    if response.status == 503 and isinstance(body, dict) and body.get("error") == "not_processed":
        return ChargeResult(outcome=Outcome.PROVIDER_ERROR, reason="echo: not processed")
    return ChargeResult(outcome=Outcome.UNKNOWN, reason=f"echo answered {response.status}")


def lookup_result(payment: dict[str, Any], request: AttemptRequest) -> LookupResult:
    """A payment found under the attempt's key: its result, or an anomaly if it is another's."""
    mine = (request.amount_minor, request.currency, request.merchant_reference)
    theirs = (payment.get("amount_minor"), payment.get("currency"), payment.get("reference"))
    if theirs != mine:
        return LookupResult(found=True, anomaly=f"the payment under this key is {theirs}, not {mine}")
    return LookupResult(found=True, result=payment_result(payment))


class EchoProvider:
    config_type: ClassVar[type[ProviderConfig]] = EchoConfig
    capabilities = Capabilities(honours_idempotency_key=True, lookup_by_key=True, lookup_by_reference=False)

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, EchoConfig)
        self.name = name
        self._key = require_secret(config.secret_name, needed_by=f"providers.{name} (the Echo API key)")
        self._note = config.greeting
        self.session = open_session(config)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + self._key.reveal()}

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        body = {
            "amount_minor": request.amount_minor,
            "currency": request.currency,
            "token": request.payment_method,
            "reference": request.merchant_reference,
            "note": self._note,
        }
        headers = self._auth() | {
            "Idempotency-Key": request.idempotency_key,
            "Content-Type": "application/json",
        }
        answer = await exchange(
            self.session, "POST", "charges", body=json.dumps(body).encode(), headers=headers
        )
        return charge_result(answer) if isinstance(answer, HttpResponse) else answer

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        path = f"charges/{quote(request.idempotency_key, safe='')}"
        answer = await exchange(self.session, "GET", path, headers=self._auth())
        if not isinstance(answer, HttpResponse):
            return None  # could not ask
        if answer.status == 404:
            return LookupResult(found=False)
        if answer.status != 200:
            return None
        try:
            payment = json.loads(answer.body)
        except ValueError:
            return None
        return lookup_result(payment, request) if isinstance(payment, dict) else None

    async def close(self) -> None:
        await self.session.close()

    def __repr__(self) -> str:
        return f"EchoProvider({self.name!r})"
