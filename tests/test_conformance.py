"""payd's adapter conformance kit (``daemon.providers.conformance``), run on every adapter.

The four built-in adapters run it against the sandbox gateway's dialect of their provider
(started by the ``sandbox`` fixture): the payment token picks approve / decline / charge-then-
hang, and the gateway's injected error rate is the failure before processing. Their official
status values are the tables of ``tests/test_provider_enums.py`` (taken from the providers' own
specifications and SDKs). The example plugin runs it against its own fake. Deliberately broken
adapters show that each check can fail.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Final

import msgspec
import pytest
import structlog

from daemon.models import AttemptRequest, ChargeResult, Outcome
from daemon.providers.adyen.client import AdyenProvider, AdyenProviderConfig
from daemon.providers.api import Capabilities, LookupResult, ProviderConfig
from daemon.providers.checkout.client import CheckoutProvider
from daemon.providers.conformance import (
    AdapterConformance,
    Charged,
    Exit,
    NoExit,
    Scenario,
    StatusSample,
    capability_problems,
    status_exit,
)
from daemon.providers.iyzico.client import IyzicoProvider, IyzicoProviderConfig
from daemon.providers.sandbox import transform as sandbox_transform
from daemon.providers.sandbox.adapter import SandboxProvider, SandboxProviderConfig
from daemon.providers.stripe.client import StripeProvider
from tests import test_provider_adyen, test_provider_checkout, test_provider_iyzico, test_provider_stripe
from tests.plugins.payd_echo_provider import EchoProvider
from tests.plugins.payd_echo_provider.testing import API_KEY as ECHO_KEY
from tests.plugins.payd_echo_provider.testing import EchoConformance, EchoFake
from tests.support import Sandbox
from tests.test_provider_enums import IN_PROGRESS, SAMPLES

# The gateway's tokens (daemon/providers/sandbox/behaviour.py TOKEN_OUTCOMES), shared by every dialect.
TOKENS: Final = {
    Scenario.APPROVE: "pm_ok",
    Scenario.DECLINE: "pm_stolen",
    Scenario.FAIL_BEFORE_PROCESSING: "pm_ok",  # with every charge failing before processing
    Scenario.CHARGE_THEN_HANG: "pm_timeout",
}
HANG_S: Final = 5.0  # well past the kit's hang_timeout_s
SANDBOX_DOC: Final = Path(__file__).resolve().parents[1] / "docs" / "sandbox.md"


class SandboxFace:
    """One dialect of the sandbox gateway as the kit's ``Fake``: its ledger is the fake's books."""

    def __init__(self, sandbox: Sandbox, prefix: str) -> None:
        self.sandbox = sandbox
        self.base_url = f"{sandbox.url}{prefix}"

    async def charged(self, request: AttemptRequest) -> list[Charged]:
        return [
            Charged(charge["amount_minor"], charge["currency"])
            for charge in await self.sandbox.ledger()
            if charge["status"] == "approved" and charge["merchant_reference"] == request.merchant_reference
        ]

    async def play(self, scenario: Scenario) -> None:
        failing = scenario is Scenario.FAIL_BEFORE_PROCESSING
        await self.sandbox.behave(error_rate=1.0 if failing else 0.0, hang_s=HANG_S)


class SandboxDialectConformance(AdapterConformance):
    """The kit on a built-in adapter against its sandbox dialect."""

    kind: ClassVar[str]
    prefix: ClassVar[str | None] = None  # default: /KIND

    @pytest.fixture
    def fake(self, sandbox: Sandbox) -> SandboxFace:
        return SandboxFace(sandbox, f"/{self.kind}" if self.prefix is None else self.prefix)

    def payment_method(self, scenario: Scenario, request: AttemptRequest) -> str:
        return TOKENS[scenario]

    async def arrange(self, fake: Any, scenario: Scenario, request: AttemptRequest) -> AttemptRequest:
        await fake.play(scenario)
        return msgspec.structs.replace(request, payment_method=self.payment_method(scenario, request))

    def official_statuses(self) -> Iterable[StatusSample]:
        for provider, field, value, sample in SAMPLES:
            if provider == self.kind:
                in_progress = (field, value) in IN_PROGRESS[provider]
                yield StatusSample(field, value, *sample(), in_progress=in_progress)


class TestStripeConformance(SandboxDialectConformance):
    kind = "stripe"
    provider_class = StripeProvider
    secrets: ClassVar = {"stripe_api_key": test_provider_stripe.API_KEY}

    def provider_config(self, base_url: str, *, timeout_s: float) -> ProviderConfig:
        return test_provider_stripe.stripe_config(base_url, timeout_s=timeout_s)


class TestAdyenConformance(SandboxDialectConformance):
    kind = "adyen"
    provider_class = AdyenProvider
    secrets: ClassVar = {"adyen_api_key": test_provider_adyen.API_KEY}

    def provider_config(self, base_url: str, *, timeout_s: float) -> ProviderConfig:
        table = {
            "kind": "adyen",
            "base_url": base_url,
            "max_in_flight": 10,
            "timeout_s": timeout_s,
            "merchant_account": test_provider_adyen.MERCHANT,
        }
        return msgspec.convert(table, AdyenProviderConfig)


class TestCheckoutConformance(SandboxDialectConformance):
    kind = "checkout"
    provider_class = CheckoutProvider
    secrets: ClassVar = {"checkout_api_key": test_provider_checkout.SECRET_KEY}

    def provider_config(self, base_url: str, *, timeout_s: float) -> ProviderConfig:
        return test_provider_checkout.provider_config(base_url, timeout_s=timeout_s)


class TestIyzicoConformance(SandboxDialectConformance):
    kind = "iyzico"
    provider_class = IyzicoProvider
    currency = "TRY"
    secrets: ClassVar = {
        "iyzico_api_key": test_provider_iyzico.SANDBOX_API_KEY,
        "iyzico_secret_key": test_provider_iyzico.SANDBOX_SECRET_KEY,
    }

    def provider_config(self, base_url: str, *, timeout_s: float) -> ProviderConfig:
        # The errorCode the dialect answers for "no such payment", as an operator configures it
        # (without it payd never concludes that iyzico did not receive an attempt).
        codes = (test_provider_iyzico.NOT_FOUND_ERROR_CODE,)
        return IyzicoProviderConfig(
            kind="iyzico",
            base_url=base_url,
            max_in_flight=10,
            timeout_s=timeout_s,
            lookup_not_found_error_codes=codes,
        )

    def payment_method(self, scenario: Scenario, request: AttemptRequest) -> str:
        return f"cuk-{request.idempotency_key}:{TOKENS[scenario]}"  # cardUserKey:cardToken


def sandbox_answers() -> list[tuple[int, str, bytes]]:
    """(HTTP status, status or error type, body) of every charge answer docs/sandbox.md lists."""
    text = SANDBOX_DOC.read_text(encoding="utf-8")
    table = text.split("### `POST /v1/charges`", 1)[1].split("Answers:", 1)[1].split("The charge object:")[0]
    answers = []
    for status, cell in re.findall(r"^\| (\d{3}) \| (.*?) \|", table, re.M):
        body = re.search(r"`(\{.*?\}\})`", cell)
        if body is not None:  # an error body, as documented
            answers.append((int(status), json.loads(body.group(1))["error"]["type"], body.group(1).encode()))
        else:  # the charge object with this status
            charge_status = re.search(r'"status": "(\w+)"', cell)
            assert charge_status is not None, cell
            answers.append((int(status), charge_status.group(1), b""))
    return answers


class TestSandboxConformance(SandboxDialectConformance):
    """The sandbox adapter against the gateway's own API (``/v1/charges``, docs/sandbox.md)."""

    kind = "sandbox"
    prefix = ""
    provider_class = SandboxProvider

    def provider_config(self, base_url: str, *, timeout_s: float) -> ProviderConfig:
        table = {"kind": "sandbox", "base_url": base_url, "max_in_flight": 10, "timeout_s": timeout_s}
        return msgspec.convert(table, SandboxProviderConfig)

    def official_statuses(self) -> Iterable[StatusSample]:
        request = self.attempt()

        def charge(status: str, **changes: Any) -> bytes:
            fields = {
                "id": "ch_1",
                "status": status,
                "decline_code": "insufficient_funds" if status == "declined" else None,
                "retryable": status == "declined",
                "idempotency_key": request.idempotency_key,
                "merchant_reference": request.merchant_reference,
                "amount_minor": request.amount_minor,
                "currency": request.currency,
                "created_at": 1795000000.0,
            }
            return json.dumps(fields | changes).encode()

        # What a lookup under the key reads after each unknown answer (docs/sandbox.md, "Order of
        # processing"): 409, the charge still in progress, finished; 422, the other charge.
        after = {
            "idempotency_conflict": charge("approved"),
            "idempotency_mismatch": charge("approved", amount_minor=request.amount_minor + 1),
        }
        answers = sandbox_answers()
        assert {status for status, _, _ in answers} >= {200, 402, 409, 422, 500}, answers
        for status, value, error in answers:
            first = sandbox_transform.charge_result(status, {"Retry-After": "1"}, error or charge(value))
            if error:  # nothing was stored under the key, unless another request holds it
                stored = after.get(value)
                found = None if stored is None else sandbox_transform.lookup_result(200, stored, request)
                later = None if found is None else found.result
            else:
                later = sandbox_transform.lookup_result(status, charge(value), request).result
            yield StatusSample(str(status), value, first, later)


class TestEchoPluginConformance(EchoConformance):
    """The example plugin, from its own package's test support, against its own fake."""


# --- the kit can fail: Echo, broken one way at a time -------------------------------------------


class TimeoutIsProviderError(EchoProvider):
    """Says "nothing charged" where the answer timed out after sending."""

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        result = await super().charge(request)
        if result.outcome is Outcome.UNKNOWN:
            return ChargeResult(outcome=Outcome.PROVIDER_ERROR, reason="timeout")
        return result


class RefusedIsReached(EchoProvider):
    """Loses "never sent": failover could not act on it."""

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        result = await super().charge(request)
        return msgspec.structs.replace(result, reached_provider=True)


class FreshKeyEachTime(EchoProvider):
    """Claims keys are honoured but sends a new one per call."""

    calls = 0

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        FreshKeyEachTime.calls += 1
        key = f"{request.idempotency_key}-{FreshKeyEachTime.calls}"
        return await super().charge(msgspec.structs.replace(request, idempotency_key=key))


class LookupTrustsAnyAmount(EchoProvider):
    """Takes whatever is under the key for the attempt."""

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        found = await super().lookup(request)
        if found is not None and found.anomaly is not None:
            return LookupResult(found=True, result=ChargeResult(outcome=Outcome.APPROVED, provider_ref="x"))
        return found


class LookupNeverAnswers(EchoProvider):
    """Claims lookup by key and never answers."""

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        return None


class NotFoundWithoutLookup(EchoProvider):
    """Claims no lookup, yet says "not found": reconciliation would take it at its word."""

    capabilities = Capabilities(honours_idempotency_key=True, lookup_by_key=False, lookup_by_reference=False)

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        return LookupResult(found=False)


class LogsItsKey(EchoProvider):
    async def charge(self, request: AttemptRequest) -> ChargeResult:
        structlog.get_logger("echo").debug("charging", headers=self._auth())
        return await super().charge(request)


class LogsItsKeyThroughLogging(EchoProvider):
    async def charge(self, request: AttemptRequest) -> ChargeResult:
        logging.getLogger("echo").debug("charging with %s", self._auth())
        return await super().charge(request)


class KeyInRepr(EchoProvider):
    def __repr__(self) -> str:
        return f"EchoProvider({self._auth()})"


class RaisesWithTheKey(EchoProvider):
    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        raise RuntimeError(f"lookup failed with {self._auth()}")


class InconsistentCapabilities(EchoProvider):
    capabilities = Capabilities(
        honours_idempotency_key=False,
        lookup_by_key=True,
        lookup_by_reference=False,
        resend_only_after_2xx=True,
    )


BROKEN: Final = [
    (TimeoutIsProviderError, "test_a_timeout_after_sending_is_unknown", "charged, then timed out, but"),
    (RefusedIsReached, "test_a_refused_connection_is_nothing_sent", "a refused connection came back as"),
    (FreshKeyEachTime, "test_the_same_key_twice_charges_once", "one key, charged more than once"),
    (LookupTrustsAnyAmount, "test_lookup_finds_what_was_charged_and_only_that", "another amount"),
    (LookupNeverAnswers, "test_lookup_finds_what_was_charged_and_only_that", "missed a charged attempt"),
    (LookupNeverAnswers, "test_a_timeout_after_sending_is_unknown", "missed a charged attempt"),
    (NotFoundWithoutLookup, "test_lookup_finds_what_was_charged_and_only_that", "no lookup capability"),
    (LogsItsKey, "test_secrets_never_show", "echo_api_key shows in a log record"),
    (LogsItsKeyThroughLogging, "test_secrets_never_show", "echo_api_key shows in a log record"),
    (KeyInRepr, "test_secrets_never_show", r"echo_api_key shows in repr\(adapter\)"),
    (RaisesWithTheKey, "test_secrets_never_show", "echo_api_key shows in the text of RuntimeError"),
    (
        InconsistentCapabilities,
        "test_the_adapter_is_a_provider_with_consistent_capabilities",
        "resend_only_after_2xx is set but honours_idempotency_key is not",
    ),
]


@pytest.mark.parametrize(("adapter", "check", "message"), BROKEN, ids=[b[0].__name__ for b in BROKEN])
async def test_the_kit_fails_a_broken_adapter(
    adapter: type[EchoProvider], check: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each check, run on Echo broken in the way it guards against, fails saying what is wrong
    (the same checks pass on Echo itself, ``TestEchoPluginConformance``)."""
    suite = type(f"{adapter.__name__}Conformance", (EchoConformance,), {"provider_class": adapter})()
    monkeypatch.setenv("PAYD_ECHO_API_KEY", ECHO_KEY)
    async with EchoFake(ECHO_KEY).running() as fake:
        with pytest.raises(AssertionError, match=message) as failed:
            await getattr(suite, check)(fake)
    assert ECHO_KEY not in str(failed.value), "the kit's own message shows the secret"


def test_an_unknown_without_an_exit_is_named() -> None:
    """``status_exit`` refuses an unknown that nothing settles; it accepts each real exit."""
    unknown = ChargeResult(outcome=Outcome.UNKNOWN, reason="status 'weird'")
    lookup = Capabilities(honours_idempotency_key=False, lookup_by_key=True, lookup_by_reference=False)
    keyed = Capabilities(honours_idempotency_key=True, lookup_by_key=False, lookup_by_reference=False)
    neither = Capabilities(honours_idempotency_key=False, lookup_by_key=False, lookup_by_reference=False)
    approved = ChargeResult(outcome=Outcome.APPROVED)
    parked = ChargeResult(outcome=Outcome.UNKNOWN, needs_operator=True, reason="replayed")
    with pytest.raises(NoExit, match="unknown for ever: \"status 'weird'\""):
        status_exit(unknown, unknown, lookup, in_progress=False)
    with pytest.raises(NoExit, match="honours_idempotency_key is False"):
        status_exit(unknown, approved, neither, in_progress=False)
    with pytest.raises(NoExit, match="no way to ask again"):
        status_exit(unknown, None, neither, in_progress=False)
    assert status_exit(approved, None, neither, in_progress=False) is Exit.TERMINAL
    assert status_exit(unknown, unknown, lookup, in_progress=True) is Exit.LOOKUP
    assert status_exit(unknown, approved, lookup, in_progress=False) is Exit.LOOKUP
    assert status_exit(unknown, approved, keyed, in_progress=False) is Exit.RESEND
    assert status_exit(unknown, parked, keyed, in_progress=False) is Exit.OPERATOR
    assert status_exit(parked, None, neither, in_progress=False) is Exit.OPERATOR


async def test_capability_problems_are_each_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key TTL without honoured keys, a TTL of 0, and ``refunds`` without refund methods."""
    monkeypatch.setenv("PAYD_ECHO_API_KEY", ECHO_KEY)

    class Muddled(EchoProvider):
        capabilities = Capabilities(
            honours_idempotency_key=False,
            lookup_by_key=True,
            lookup_by_reference=False,
            idempotency_key_ttl_s=0.0,
            refunds=True,
        )

    config = EchoConformance().provider_config("http://127.0.0.1:1", timeout_s=1)
    muddled, echo = Muddled("echo", config), EchoProvider("echo", config)
    try:
        assert capability_problems(muddled) == [
            "idempotency_key_ttl_s is set but honours_idempotency_key is not",
            "idempotency_key_ttl_s must be more than 0, is 0.0",
            "refunds is set but the adapter has no refund/lookup_refund",
        ]
        assert capability_problems(echo) == []
    finally:
        await muddled.close()
        await echo.close()
