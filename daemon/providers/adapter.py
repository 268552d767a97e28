"""The skeleton of an HTTP provider adapter: the flow written once, the steps filled in per kind.

After Hyperswitch's connector integration (headers, url, request body, response
handling as the steps every connector fills in): a kind says how to build its
request and how to read the answer; the order of the steps, the classification
of transport failures and the session's lifetime are the same for every kind.

A charge is: ``prepare_charge`` (the body, or the verdict on a request that must
not be sent), ``charge_headers`` (they may sign the body), one exchange on
``charge_path``, ``charge_result`` on the answer. A transport failure comes back
from ``exchange`` already classified (never sent / may have charged).

A refund is the same flow with its own steps: ``refund_problem`` (a refund this
provider cannot take, refused unsent), ``refund_path`` (addressed by the charge's
provider id), ``refund_body``, ``refund_headers``, ``refund_result``;
``lookup_refund`` asks after one by its key. A kind that fills them in sets
``Capabilities.refunds``; the defaults refuse without sending anything. A kind that
can also void overrides ``reversal_operation``; each step then reads
``request.operation`` (stored with the claim, so a resend addresses the same one).
An answer that says "received, decided later" is ``Outcome.UNKNOWN`` with
``accepted=True``: the reversal becomes pending and is never sent again.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import ClassVar, Generic, TypeVar

import aiohttp

from daemon.models import AttemptRequest, ChargeResult, Outcome, ReversalOperation, ReversalRequest
from daemon.providers.base import Capabilities, LookupResult, ProviderConfig
from daemon.providers.http import HttpResponse, exchange, open_session

Prepared = TypeVar("Prepared")
"""What ``prepare_charge`` hands on: the body itself (``bytes``), or the body with what the
answer will be checked against."""

_NO_REFUNDS = "this provider kind does not implement refunds (Capabilities.refunds is False)"


class HttpAdapter(abc.ABC, Generic[Prepared]):
    """A provider reached over HTTP. Satisfies ``Provider``; the subclass sets ``capabilities``."""

    capabilities: Capabilities
    charge_method: ClassVar[str] = "POST"

    def __init__(self, name: str, config: ProviderConfig, *, charge_path: str) -> None:
        # A subclass reads its secrets before calling this: a missing one then fails
        # before a session (and its connector) exists to be leaked.
        self.name = name
        self.charge_path = charge_path
        self.session: aiohttp.ClientSession = open_session(config)

    @abc.abstractmethod
    def prepare_charge(self, request: AttemptRequest) -> Prepared | ChargeResult:
        """The request's body (and what the answer is checked against), or, for a request
        the provider must never see, the verdict (nothing was sent)."""

    def charge_body(self, prepared: Prepared) -> bytes:
        """The bytes to send, when ``Prepared`` carries more than the body: override it then."""
        raise NotImplementedError(f"{type(self).__name__} prepares {type(prepared).__name__}, not bytes")

    @abc.abstractmethod
    def charge_headers(self, request: AttemptRequest, body: bytes) -> Mapping[str, str]:
        """Authentication, idempotency key and content type of one charge."""

    @abc.abstractmethod
    def charge_result(
        self, request: AttemptRequest, prepared: Prepared, response: HttpResponse
    ) -> ChargeResult:
        """The provider's answer mapped to an outcome (the kind's ``transform`` tables)."""

    @abc.abstractmethod
    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        """What the provider says of an earlier attempt; None when it could not be asked."""

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        prepared = self.prepare_charge(request)
        if isinstance(prepared, ChargeResult):
            return prepared
        # Most kinds prepare the body itself: skip a call on the hot path for them.
        body = prepared if isinstance(prepared, bytes) else self.charge_body(prepared)
        answer = await exchange(
            self.session,
            self.charge_method,
            self.charge_path,
            body=body,
            headers=self.charge_headers(request, body),
        )
        if isinstance(answer, HttpResponse):
            return self.charge_result(request, prepared, answer)
        return answer

    # -- refunds: steps a kind with Capabilities.refunds overrides -------------------------

    def reversal_operation(self, request: ReversalRequest) -> ReversalOperation:
        """Refund or void (a kind that can cancel before settlement overrides this)."""
        del request
        return ReversalOperation.REFUND

    def refund_problem(self, request: ReversalRequest) -> str | None:
        """Why this refund cannot be sent to this provider (refused, never sent), or None."""
        del request
        return None

    def refund_path(self, request: ReversalRequest) -> str:
        raise NotImplementedError(_NO_REFUNDS)

    def refund_body(self, request: ReversalRequest) -> bytes:
        raise NotImplementedError(_NO_REFUNDS)

    def refund_headers(self, request: ReversalRequest, body: bytes) -> Mapping[str, str]:
        raise NotImplementedError(_NO_REFUNDS)

    def refund_result(self, request: ReversalRequest, response: HttpResponse) -> ChargeResult:
        raise NotImplementedError(_NO_REFUNDS)

    async def lookup_refund(self, request: ReversalRequest) -> LookupResult | None:
        """What the provider says of an earlier refund; None when it could not be asked."""
        return None

    async def refund(self, request: ReversalRequest) -> ChargeResult:
        if not self.capabilities.refunds:
            # Never sent: the pipeline refuses such refunds before they get here.
            return ChargeResult(outcome=Outcome.PROVIDER_ERROR, retryable=False, reason=_NO_REFUNDS)
        problem = self.refund_problem(request)
        if problem is not None:
            return ChargeResult(
                outcome=Outcome.PROVIDER_ERROR,
                retryable=False,
                decline_code="not_refundable_here",
                reason=f"not sent: {problem}",
            )
        body = self.refund_body(request)
        answer = await exchange(
            self.session,
            "POST",
            self.refund_path(request),
            body=body,
            headers=self.refund_headers(request, body),
        )
        if isinstance(answer, HttpResponse):
            return self.refund_result(request, answer)
        return answer

    async def send(
        self, method: str, path: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> HttpResponse | None:
        """One exchange outside the charge flow (a lookup): the answer, or None when the
        provider could not be asked (not connected, timed out, connection lost)."""
        answer = await exchange(self.session, method, path, body=body, headers=headers)
        return answer if isinstance(answer, HttpResponse) else None

    async def close(self) -> None:
        await self.session.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
