"""The sandbox gateway adapter: the client half (the mapping lives in ``transform``)."""

from __future__ import annotations

from typing import ClassVar

import aiohttp

from daemon.config import ProviderConfig
from daemon.models import AttemptRequest, ChargeResult
from daemon.providers.base import Capabilities, LookupResult
from daemon.providers.http import HttpResponse, exchange, open_session
from daemon.providers.sandbox import transform


class SandboxProviderConfig(ProviderConfig, frozen=True):
    account: str | None = None
    """Sent as ``Sandbox-Account`` so the gateway keeps stats per account; defaults to the name."""


class SandboxProvider:
    config_type: ClassVar[type[ProviderConfig]] = SandboxProviderConfig
    capabilities: Capabilities = Capabilities(
        honours_idempotency_key=True, lookup_by_key=True, lookup_by_reference=False
    )

    def __init__(self, name: str, config: ProviderConfig) -> None:
        assert isinstance(config, SandboxProviderConfig)
        self.name = name
        self._session: aiohttp.ClientSession = open_session(config)
        self._account = config.account or name

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        headers = {
            "Idempotency-Key": request.idempotency_key,
            "Sandbox-Account": self._account,
            "Content-Type": "application/json",
        }
        answer = await exchange(
            self._session,
            "POST",
            "/v1/charges",
            body=transform.charge_body(request),
            headers=headers,
        )
        if isinstance(answer, HttpResponse):
            return transform.charge_result(answer.status, answer.headers, answer.body)
        return answer

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        answer = await exchange(
            self._session,
            "GET",
            f"/v1/charges/{request.idempotency_key}",
            headers={"Sandbox-Account": self._account},
        )
        if not isinstance(answer, HttpResponse):
            return None
        if answer.status == 404:
            return LookupResult(found=False)
        if answer.status in (200, 402):
            return LookupResult(found=True, result=transform.charge_result(answer.status, {}, answer.body))
        return None

    async def close(self) -> None:
        await self._session.close()
