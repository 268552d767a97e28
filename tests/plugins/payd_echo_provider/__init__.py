"""A provider kind from a package of its own, written against ``daemon.providers.api`` alone.

It approves everything without a call: what it shows is the shape of a plugin
(a configuration type with its own keys, capabilities, the three methods) and
that a plugin needs nothing else of payd. ``tests/test_protections.py`` installs
it under the entry point ``payd.providers: echo``.
"""

from __future__ import annotations

from typing import ClassVar

from daemon.providers.api import (
    AttemptRequest,
    Capabilities,
    ChargeResult,
    LookupResult,
    Outcome,
    ProviderConfig,
)


class EchoConfig(ProviderConfig, frozen=True):
    greeting: str = "hi"


class EchoProvider:
    config_type: ClassVar[type[ProviderConfig]] = EchoConfig
    capabilities = Capabilities(honours_idempotency_key=True, lookup_by_key=False, lookup_by_reference=False)

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name

    async def charge(self, request: AttemptRequest) -> ChargeResult:
        return ChargeResult(outcome=Outcome.APPROVED, provider_ref="echo")

    async def lookup(self, request: AttemptRequest) -> LookupResult | None:
        return None

    async def close(self) -> None:
        pass
