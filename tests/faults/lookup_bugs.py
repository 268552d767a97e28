"""A provider kind for fault tests: the sandbox's charges, with lookups that misbehave as real
adapters have. Installed through the ``payd.providers`` entry point like any plugin.

- a customer reference is sent in a header, as some adapters do; one holding a newline makes
  aiohttp raise ``ValueError`` before anything is sent (its header-injection guard,
  ``aiohttp/http_writer.py: _safe_header``);
- a customer reference starting with ``hang`` makes the lookup never answer;
- refunds are the sandbox's, but ``lookup_refund`` of a refund whose reason starts with
  ``raise`` raises ``ValueError`` (an adapter that cannot read what it is asked about), and
  one of a refund whose reason starts with ``hang`` never answers.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

import aiohttp

from daemon.config import ProviderConfig
from daemon.models import AttemptRequest, ChargeResult, ReversalRequest
from daemon.providers.base import Capabilities, LookupResult
from daemon.providers.sandbox.adapter import SandboxProvider, SandboxProviderConfig

ENTRY_POINT = "lookup_bugs = tests.faults.lookup_bugs:LookupBugProvider"


class LookupBugProvider:
    config_type: ClassVar[type[ProviderConfig]] = SandboxProviderConfig
    capabilities: Capabilities = SandboxProvider.capabilities

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self._sandbox = SandboxProvider(name, config)
        self._base_url = config.base_url
        self._session = aiohttp.ClientSession()

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        return await self._sandbox.charge(request)

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        reference = request.customer_ref or ""
        if reference.startswith("hang"):
            await asyncio.Event().wait()
        if reference:
            url = f"{self._base_url}/v1/charges/{request.idempotency_key}"
            async with self._session.get(url, headers={"Customer-Reference": reference}):
                pass
        return await self._sandbox.lookup(request)

    async def refund(self, request: ReversalRequest) -> ChargeResult:
        return await self._sandbox.refund(request)

    async def lookup_refund(self, request: ReversalRequest) -> LookupResult | None:
        if (request.reason or "").startswith("raise"):
            raise ValueError(f"cannot read refund {request.idempotency_key}")
        if (request.reason or "").startswith("hang"):
            await asyncio.Event().wait()
        return await self._sandbox.lookup_refund(request)

    async def close(self) -> None:
        await self._session.close()
        await self._sandbox.close()
