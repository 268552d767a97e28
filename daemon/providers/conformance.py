"""The adapter conformance kit: one pytest suite every provider adapter runs against its own fake.

Test tooling shipped for plugin authors, not part of the daemon: no module of payd imports it
(``tests/test_architecture.py``), and it needs pytest, which the daemon does not. Like an
adapter, it uses nothing of payd but ``daemon.providers.api``, so a plugin's tests can rely on
it as they rely on the API.

An author subclasses ``AdapterConformance`` in a test module (a class named ``Test...``), names
the adapter class and its secrets, and fills in four hooks: a ``fake`` fixture (their
provider's fake, a real HTTP server satisfying ``Fake``), ``provider_config`` (the adapter's
configuration against a base URL), ``arrange`` (how to make the fake approve, decline, fail
before processing, or charge and then hang) and ``official_statuses`` (every value of the
provider's documented status enumerations, each with what the adapter makes of it). The
inherited tests then check, over real HTTP, what the pipeline relies on:

- the same idempotency key twice charges once (by the fake's own count), unless the
  capabilities say keys are not honoured; a re-send after a timeout likewise, where the
  capabilities allow one;
- a refused connection is "nothing sent" (``provider_error``, ``reached_provider=False``); a
  read timeout after the request went out is ``unknown``, never a decline or "nothing charged";
- a failure before processing is never an approval or a decline;
- a lookup (where the capabilities claim one) finds a charged attempt with its true outcome,
  says "not found" for a key never sent, and flags a found payment of another amount as an
  anomaly; without the capability it never answers at all;
- every official status value ends terminal or unknown with an exit (``status_exit``);
- the secrets' values appear in no log record (structlog and the standard library), in no
  ``repr``/``str`` of the adapter or its configuration, in no result and no exception text;
- the capabilities are consistent with each other and with the adapter.

See docs/providers.md, "Conformance kit".
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import msgspec
import pytest
import structlog

from daemon.providers.api import (
    AttemptRequest,
    Capabilities,
    ChargeResult,
    LookupResult,
    Outcome,
    Provider,
    ProviderConfig,
    ProviderFactory,
    RefundingProvider,
)

__all__ = [
    "AdapterConformance",
    "Charged",
    "Exit",
    "Fake",
    "NoExit",
    "Scenario",
    "StatusSample",
    "capability_problems",
    "status_exit",
]

_DECLINES = frozenset({Outcome.SOFT_DECLINE, Outcome.HARD_DECLINE})
_CHARGED_NOTHING = frozenset({Outcome.RATE_LIMITED, Outcome.PROVIDER_ERROR})
_DIGITS_AS_LETTERS = str.maketrans("0123456789", "ghijklmnop")


class Scenario(enum.Enum):
    """What ``arrange`` makes the fake do with the attempt it returns."""

    APPROVE = "approve"
    """Charge it and answer "approved"."""
    DECLINE = "decline"
    """Decline it (soft or hard) and answer so."""
    FAIL_BEFORE_PROCESSING = "fail_before_processing"
    """Answer an error without processing anything (a 5xx, an overload): nothing charged."""
    CHARGE_THEN_HANG = "charge_then_hang"
    """Charge it, then keep the answer back well past ``AdapterConformance.hang_timeout_s``."""


class Charged(NamedTuple):
    """One charge the fake executed (approved): what it took."""

    amount_minor: int
    currency: str


@runtime_checkable
class Fake(Protocol):
    """The provider's fake as the kit sees it: where it listens and what it charged."""

    base_url: str
    """What the adapter's ``base_url`` is set to (with any path prefix the adapter expects)."""

    async def charged(self, request: AttemptRequest) -> Sequence[Charged]:
        """Every approved charge the fake executed for this attempt, by its own books."""
        ...


class StatusSample(NamedTuple):
    """One official status value and what the adapter makes of it.

    ``first`` is the adapter's mapping of a charge answer carrying the value; ``later`` is what
    reconciliation then reads: a lookup's result for a provider with lookup, a resend's replay
    for one without; None when there is no way to ask again. ``in_progress`` is True only for
    values the provider documents as moving on by themselves.
    """

    field: str
    value: str
    first: ChargeResult
    later: ChargeResult | None
    in_progress: bool = False


class Exit(enum.StrEnum):
    """How an attempt gets out of an answer: settled at once, or how reconciliation settles it."""

    TERMINAL = "terminal"
    LOOKUP = "lookup"
    RESEND = "resend"
    OPERATOR = "operator"


class NoExit(AssertionError):
    """An answer that would leave an attempt unknown for ever."""


def status_exit(
    first: ChargeResult, later: ChargeResult | None, capabilities: Capabilities, *, in_progress: bool
) -> Exit:
    """The exit of an attempt whose charge answered ``first``; ``later`` is what reconciliation
    reads afterwards (a lookup, or for a provider without one, a resend's replay).

    Raises ``NoExit`` for an unknown that no later answer settles and no operator is asked
    about: reconciliation would ask for ever.
    """
    if first.outcome is not Outcome.UNKNOWN:
        return Exit.TERMINAL
    if later is None:
        if first.needs_operator:
            return Exit.OPERATOR
        raise NoExit(f"unknown ({first.reason!r}) with no way to ask again and no operator")
    if later.needs_operator and later.outcome is Outcome.UNKNOWN:
        return Exit.OPERATOR
    has_lookup = capabilities.lookup_by_key or capabilities.lookup_by_reference
    if later.outcome is not Outcome.UNKNOWN:
        if has_lookup:
            return Exit.LOOKUP
        if capabilities.honours_idempotency_key:
            return Exit.RESEND
        raise NoExit(
            f"unknown ({first.reason!r}) settles only on a resend, and the capabilities say a "
            "resend may charge again (honours_idempotency_key is False)"
        )
    if has_lookup and in_progress:
        return Exit.LOOKUP
    raise NoExit(f"unknown for ever: {first.reason!r}, then {later.reason!r}")


def capability_problems(provider: Provider) -> list[str]:
    """What is inconsistent in a provider's capabilities, as sentences (empty: nothing)."""
    capabilities = provider.capabilities
    problems = []
    if not isinstance(capabilities, Capabilities):
        return [f"capabilities is a {type(capabilities).__name__}, not a Capabilities"]
    if capabilities.resend_only_after_2xx and not capabilities.honours_idempotency_key:
        problems.append("resend_only_after_2xx is set but honours_idempotency_key is not")
    ttl = capabilities.idempotency_key_ttl_s
    if ttl is not None and not capabilities.honours_idempotency_key:
        problems.append("idempotency_key_ttl_s is set but honours_idempotency_key is not")
    if ttl is not None and not ttl > 0:
        problems.append(f"idempotency_key_ttl_s must be more than 0, is {ttl}")
    if capabilities.refunds and not isinstance(provider, RefundingProvider):
        problems.append("refunds is set but the adapter has no refund/lookup_refund")
    return problems


def _closed_port_url(base_url: str) -> str:
    """``base_url`` moved to a loopback port nothing listens on (path and query kept)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Closed again: connecting to it is refused.
    return urllib.parse.urlsplit(base_url)._replace(netloc=f"127.0.0.1:{port}").geturl()


class _StdlibCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def _captured_logs() -> Iterator[list[str]]:
    """Every log record made inside, as text: structlog events (all levels, before any
    redaction) and standard-library records of every logger (all levels)."""
    texts: list[str] = []
    handler = _StdlibCapture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with structlog.testing.capture_logs() as events:
            yield texts
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        texts.extend(repr(event) for event in events)
        texts.extend(handler.lines)


class AdapterConformance:
    """The conformance suite. Subclass it as ``Test<Kind>Conformance`` in a test module.

    Set ``provider_class`` and ``secrets``; provide the ``fake`` fixture and the hooks below
    (``provider_config``, ``arrange``, ``official_statuses``). Class attributes below the
    hooks may be overridden (currency, amount, the timeouts).
    """

    # The checks are coroutines: marked so, they run under pytest-asyncio in strict mode too
    # (never skipped as "not a test" there, which would look like a pass).
    pytestmark: ClassVar = [pytest.mark.asyncio]

    provider_class: ClassVar[ProviderFactory]
    """The adapter class, as the ``payd.providers`` entry point names it."""
    secrets: ClassVar[Mapping[str, str]] = {}
    """Secret name -> a test value. The kit puts each in the environment (``PAYD_<NAME>``) and
    checks that no value ever shows."""
    provider_name: ClassVar[str] = "conformance"
    currency: ClassVar[str] = "EUR"
    amount_minor: ClassVar[int] = 1999
    timeout_s: ClassVar[float] = 5.0
    """The adapter's ``timeout_s`` in every check but the hang."""
    hang_timeout_s: ClassVar[float] = 1.0
    """The adapter's ``timeout_s`` when the fake charges and hangs: the fake must hang longer."""

    # -- hooks ------------------------------------------------------------------------------

    def provider_config(self, base_url: str, *, timeout_s: float) -> ProviderConfig:
        """The adapter's configuration (its ``config_type``) against ``base_url``."""
        raise NotImplementedError("AdapterConformance.provider_config: build your adapter's config")

    async def arrange(self, fake: Any, scenario: Scenario, request: AttemptRequest) -> AttemptRequest:
        """``request`` made to play ``scenario`` at ``fake`` (e.g. its payment method set to
        the fake's token for it, or the fake switched over). Keep its key, reference, amount
        and currency."""
        raise NotImplementedError("AdapterConformance.arrange: make your fake play the scenario")

    def official_statuses(self) -> Iterable[StatusSample]:
        """Every value of the provider's documented status enumerations (and response-code
        classes), each with the adapter's mapping of it (``StatusSample``)."""
        raise NotImplementedError("AdapterConformance.official_statuses: list the provider's values")

    def refused_base_url(self, fake: Any) -> str:
        """A base URL at which connecting is refused: by default the fake's, on a closed port."""
        return _closed_port_url(fake.base_url)

    # -- plumbing ---------------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def conformance_secrets(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name, value in self.secrets.items():
            monkeypatch.setenv(f"PAYD_{name.upper()}", value)

    @contextlib.asynccontextmanager
    async def adapter(self, base_url: str, *, timeout_s: float | None = None) -> AsyncIterator[Provider]:
        config = self.provider_config(base_url, timeout_s=timeout_s or self.timeout_s)
        provider = self.provider_class(self.provider_name, config)
        try:
            yield provider
        finally:
            await provider.close()

    def attempt(self) -> AttemptRequest:
        """A fresh attempt: its own key and subscription cycle."""
        unique = uuid.uuid4()
        return AttemptRequest(
            # Letters only: a run of digits in the key could pass for a card number wherever it
            # is echoed (a payment method built from it is refused then).
            idempotency_key="conformance-" + unique.hex.translate(_DIGITS_AS_LETTERS),
            subscription_id=1 + unique.int % (2**31 - 1),
            cycle=1,
            amount_minor=self.amount_minor,
            currency=self.currency,
            provider=self.provider_name,
            payment_method="conformance-placeholder",
            customer_ref="conformance-customer",
        )

    async def arranged(self, fake: Any, scenario: Scenario) -> AttemptRequest:
        given = self.attempt()
        request = await self.arrange(fake, scenario, given)
        kept = (request.idempotency_key, request.merchant_reference, request.amount_minor, request.currency)
        wanted = (given.idempotency_key, given.merchant_reference, given.amount_minor, given.currency)
        assert kept == wanted, f"arrange({scenario}) changed the attempt's key, reference or amount"
        return request

    async def charged(self, fake: Any, request: AttemptRequest) -> list[Charged]:
        charges = list(await fake.charged(request))
        for charge in charges:
            assert (charge.amount_minor, charge.currency) == (request.amount_minor, request.currency), (
                f"the fake charged {charge} for an attempt of {request.amount_minor} {request.currency}"
            )
        return charges

    @staticmethod
    def has_lookup(provider: Provider) -> bool:
        return provider.capabilities.lookup_by_key or provider.capabilities.lookup_by_reference

    # -- the checks -------------------------------------------------------------------------

    async def test_the_adapter_is_a_provider_with_consistent_capabilities(self, fake: Any) -> None:
        """The class is a ``payd.providers`` factory whose instances are ``Provider``s, named as
        configured, and its capabilities do not contradict each other or the adapter."""
        assert isinstance(fake, Fake), "the fake fixture must have base_url and charged()"
        config = self.provider_config(fake.base_url, timeout_s=self.timeout_s)
        assert isinstance(config, self.provider_class.config_type), "provider_config() gives config_type"
        async with self.adapter(fake.base_url) as provider:
            assert isinstance(provider, Provider), "the adapter lacks a Provider member"
            assert provider.name == self.provider_name, (
                f"named {provider.name!r}, configured as {self.provider_name!r}"
            )
            problems = capability_problems(provider)
            assert not problems, f"inconsistent capabilities: {'; '.join(problems)}"

    async def test_approval_and_decline_are_what_the_fake_did(self, fake: Any) -> None:
        """An approval is APPROVED with the provider's reference and charged once; a decline is
        a decline and charged nothing."""
        async with self.adapter(fake.base_url) as provider:
            approve = await self.arranged(fake, Scenario.APPROVE)
            approved = await provider.charge(approve)
            decline = await self.arranged(fake, Scenario.DECLINE)
            declined = await provider.charge(decline)
        assert approved.outcome is Outcome.APPROVED, f"the fake approved, the adapter said {approved}"
        assert approved.provider_ref, "an approval carries the provider's reference"
        assert len(await self.charged(fake, approve)) == 1, "an approval the fake did not charge once"
        assert declined.outcome in _DECLINES, f"the fake declined, the adapter said {declined}"
        assert await self.charged(fake, decline) == [], "a decline the fake charged"

    async def test_the_same_key_twice_charges_once(self, fake: Any) -> None:
        """Where the capabilities say keys are honoured, a second charge under the same key is
        answered without charging again (the fake's own count)."""
        async with self.adapter(fake.base_url) as provider:
            if not provider.capabilities.honours_idempotency_key:
                pytest.skip("capabilities: keys are not honoured, so payd never sends an attempt twice")
            request = await self.arranged(fake, Scenario.APPROVE)
            first = await provider.charge(request)
            again = await provider.charge(request)
        assert len(await self.charged(fake, request)) == 1, "one key, charged more than once"
        assert first.outcome is Outcome.APPROVED, first
        assert again.outcome is Outcome.APPROVED, again
        assert again.provider_ref == first.provider_ref, (
            "the same key answered another payment",
            first,
            again,
        )

    async def test_a_refused_connection_is_nothing_sent(self, fake: Any) -> None:
        """Nothing listening: ``provider_error`` with ``reached_provider=False`` (the one answer
        failover may act on), and a lookup that could not ask says so (None)."""
        async with self.adapter(self.refused_base_url(fake)) as provider:
            request = await self.arranged(fake, Scenario.APPROVE)
            result = await provider.charge(request)
            found = await provider.lookup(request)
        assert result.outcome is Outcome.PROVIDER_ERROR, f"a refused connection came back as {result}"
        assert result.reached_provider is False, f"a refused connection came back as {result}"
        assert found is None, f"a lookup that reached nobody answered {found}"
        assert await self.charged(fake, request) == [], "the fake charged an attempt that was never sent"

    async def test_a_timeout_after_sending_is_unknown(self, fake: Any) -> None:
        """The fake charged and then kept its answer back: the attempt is UNKNOWN (never a
        decline, never "nothing charged"), and it has a way out: a lookup that finds the
        charge, a re-send under the same key that does not charge again, or an operator."""
        async with self.adapter(fake.base_url, timeout_s=self.hang_timeout_s) as provider:
            request = await self.arranged(fake, Scenario.CHARGE_THEN_HANG)
            result = await provider.charge(request)
        assert len(await self.charged(fake, request)) == 1, "the fake did not charge before hanging"
        assert result.outcome is Outcome.UNKNOWN, f"charged, then timed out, but the adapter said {result}"
        assert result.reached_provider, result
        async with self.adapter(fake.base_url) as provider:
            capabilities = provider.capabilities
            if self.has_lookup(provider):
                found = await provider.lookup(request)
                assert found is not None and found.found, f"the lookup missed a charged attempt: {found}"
                assert found.anomaly is None, found
                assert found.result is not None and found.result.outcome is Outcome.APPROVED, found
            elif capabilities.honours_idempotency_key and not capabilities.resend_only_after_2xx:
                again = await provider.charge(request)
                assert again.outcome in (Outcome.APPROVED, Outcome.UNKNOWN), again
                assert len(await self.charged(fake, request)) == 1, "a re-send charged again"
            else:
                assert result.needs_operator, (
                    "no lookup and no safe re-send: the unknown must be parked for an operator"
                )

    async def test_a_failure_before_processing_is_no_charge_and_no_decline(self, fake: Any) -> None:
        """An error the provider answers without processing is never APPROVED or a decline;
        "nothing charged" keeps ``reached_provider`` (it was reached); if the adapter cannot
        tell and says UNKNOWN, a lookup it claims finds nothing."""
        async with self.adapter(fake.base_url) as provider:
            request = await self.arranged(fake, Scenario.FAIL_BEFORE_PROCESSING)
            result = await provider.charge(request)
            assert await self.charged(fake, request) == [], (
                "the fake charged though it failed before processing"
            )
            assert result.outcome in _CHARGED_NOTHING | {Outcome.UNKNOWN}, (
                f"a failure before processing came back as {result}"
            )
            assert result.reached_provider, "the provider answered: it was reached"
            if result.outcome is Outcome.UNKNOWN and self.has_lookup(provider):
                found = await provider.lookup(request)
                assert found is not None and not found.found, (
                    f"an attempt the fake never processed was {found}"
                )

    async def test_lookup_finds_what_was_charged_and_only_that(self, fake: Any) -> None:
        """Where the capabilities claim lookup: a charged attempt is found with its outcome and
        reference, a declined one with its decline, a key never sent is not found, and a found
        payment of another amount is an anomaly, never a result. Without the capability the
        lookup answers None (cannot ask), never a verdict it cannot back."""
        async with self.adapter(fake.base_url) as provider:
            approve = await self.arranged(fake, Scenario.APPROVE)
            approved = await provider.charge(approve)
            assert approved.outcome is Outcome.APPROVED, approved
            if not self.has_lookup(provider):
                assert await provider.lookup(approve) is None, "no lookup capability, yet an answer"
                return
            found = await provider.lookup(approve)
            assert found is not None and found.found, f"the lookup missed a charged attempt: {found}"
            assert found.anomaly is None, found
            assert found.result is not None and found.result.outcome is Outcome.APPROVED, found
            assert found.result.provider_ref == approved.provider_ref, found

            decline = await self.arranged(fake, Scenario.DECLINE)
            declined = await provider.charge(decline)
            seen = await provider.lookup(decline)
            assert seen is not None and seen.found and seen.result is not None, seen
            assert seen.result.outcome is declined.outcome, (seen, declined)

            never = self.attempt()
            missing = await provider.lookup(await self.arrange(fake, Scenario.APPROVE, never))
            assert missing == LookupResult(found=False), f"a key never sent was {missing}"

            other = msgspec.structs.replace(approve, amount_minor=approve.amount_minor + 100)
            mismatch = await provider.lookup(other)
            assert mismatch is not None and mismatch.found, mismatch
            assert mismatch.anomaly, f"a payment of another amount was taken for the attempt: {mismatch}"

    async def test_every_official_status_has_an_exit(self, fake: Any) -> None:
        """Each official value ends terminal, or unknown with an exit (``status_exit``): a
        lookup (only for values documented as in progress, or one that settles), a resend
        where keys are honoured, or an operator. None may leave an attempt unknown for ever."""
        samples = list(self.official_statuses())
        assert samples, "official_statuses() lists no value"
        async with self.adapter(fake.base_url) as provider:
            capabilities = provider.capabilities
        problems = []
        for sample in samples:
            try:
                status_exit(sample.first, sample.later, capabilities, in_progress=sample.in_progress)
            except NoExit as error:
                problems.append(f"{sample.field} {sample.value!r}: {error}")
        assert not problems, "values that leave an attempt unknown for ever: " + "; ".join(problems)

    async def test_secrets_never_show(self, fake: Any) -> None:
        """Through approvals, declines, failures, a hang, a refused connection and lookups, no
        secret value appears in a log record, a repr or str of the adapter or its
        configuration, the configuration as JSON, a result, or an exception's text."""
        if not self.secrets:
            pytest.skip("the adapter names no secrets")
        texts: list[tuple[str, str]] = []
        config = self.provider_config(fake.base_url, timeout_s=self.timeout_s)
        texts += [("repr(config)", repr(config)), ("str(config)", str(config))]
        texts.append(("the configuration as JSON", msgspec.json.encode(config).decode()))
        raised: str | None = None
        with _captured_logs() as logged:
            for base_url, scenario, timeout_s in (
                (fake.base_url, Scenario.APPROVE, None),
                (fake.base_url, Scenario.DECLINE, None),
                (fake.base_url, Scenario.FAIL_BEFORE_PROCESSING, None),
                (fake.base_url, Scenario.CHARGE_THEN_HANG, self.hang_timeout_s),
                (self.refused_base_url(fake), Scenario.APPROVE, None),
            ):
                try:
                    async with self.adapter(base_url, timeout_s=timeout_s) as provider:
                        texts += [("repr(adapter)", repr(provider)), ("str(adapter)", str(provider))]
                        request = await self.arranged(fake, scenario)
                        texts.append((f"the {scenario.value} result", repr(await provider.charge(request))))
                        texts.append((f"the {scenario.value} lookup", repr(await provider.lookup(request))))
                except Exception as error:
                    raised = f"{type(error).__name__} ({scenario.value})"
                    texts.append((f"the text of {raised}", f"{error!r} {error}"))
                    raised += f": {error}"  # shown only once it is known to hold no secret
                    break
        texts += [("a log record", text) for text in logged]
        for name, value in self.secrets.items():
            # Say where, never the text: it holds the secret.
            shown = sorted({where for where, text in texts if value in text})
            assert not shown, f"the value of secret {name} shows in {', '.join(shown)}"
        assert raised is None, f"charge or lookup raised {raised}: they answer, never raise"
