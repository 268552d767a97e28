"""The sandbox gateway adapter: the client half (the mapping lives in ``transform``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from daemon.providers.api import (
    AttemptRequest,
    Capabilities,
    ChargeResult,
    HttpAdapter,
    HttpResponse,
    LookupResult,
    ProviderConfig,
    ReversalRequest,
)
from daemon.providers.sandbox import transform


class SandboxProviderConfig(ProviderConfig, frozen=True):
    account: str | None = None
    """Sent as ``Sandbox-Account`` so the gateway keeps stats per account; defaults to the name."""


class SandboxProvider(HttpAdapter[bytes]):
    config_type: ClassVar[type[ProviderConfig]] = SandboxProviderConfig
    capabilities: Capabilities = Capabilities(
        honours_idempotency_key=True, lookup_by_key=True, lookup_by_reference=False, refunds=True
    )

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, SandboxProviderConfig)
        super().__init__(name, config, charge_path="/v1/charges")
        self._account = config.account or name

    def prepare_charge(self, request: AttemptRequest) -> bytes:
        return transform.charge_body(request)

    def charge_headers(self, request: AttemptRequest, body: bytes) -> Mapping[str, str]:
        return self.charge_headers_for(request.idempotency_key)

    def charge_headers_for(self, idempotency_key: str) -> Mapping[str, str]:
        return {
            "Idempotency-Key": idempotency_key,
            "Sandbox-Account": self._account,
            "Content-Type": "application/json",
        }

    def charge_result(self, request: AttemptRequest, prepared: bytes, response: HttpResponse) -> ChargeResult:
        return transform.charge_result(response.status, response.headers, response.body)

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        answer = await self.send(
            "GET", f"/v1/charges/{request.idempotency_key}", headers={"Sandbox-Account": self._account}
        )
        if answer is None:
            return None
        if answer.status == 404:
            return LookupResult(found=False)
        if answer.status in (200, 402):
            return transform.lookup_result(answer.status, answer.body, request)
        return None

    # -- refunds ----------------------------------------------------------------------------

    def refund_path(self, request: ReversalRequest) -> str:
        return f"/v1/charges/{request.original_provider_ref}/refunds"

    def refund_body(self, request: ReversalRequest) -> bytes:
        return transform.refund_body(request)

    def refund_headers(self, request: ReversalRequest, body: bytes) -> Mapping[str, str]:
        return self.charge_headers_for(request.idempotency_key)

    def refund_result(self, request: ReversalRequest, response: HttpResponse) -> ChargeResult:
        return transform.refund_result(request, response.status, response.headers, response.body)

    async def lookup_refund(self, request: ReversalRequest) -> LookupResult | None:
        answer = await self.send(
            "GET", f"/v1/refunds/{request.idempotency_key}", headers={"Sandbox-Account": self._account}
        )
        if answer is None:
            return None
        if answer.status == 404:
            return LookupResult(found=False)
        if answer.status == 200:
            return LookupResult(found=True, result=transform.refund_result(request, 200, {}, answer.body))
        return None
