"""Echo's test support, shipped with the plugin: its fake, and payd's conformance kit run on it.

``EchoFake`` is a real HTTP server answering as Echo's API (in the package docstring) says:
it checks the bearer key, stores each payment under its idempotency key, and picks what to do
by the payment's token (``TOKENS``). It imports nothing of payd but the provider API and the
conformance kit, as a third-party plugin's tests would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any, ClassVar, Final

import msgspec
import pytest
from aiohttp import web

from daemon.providers.api import AttemptRequest, HttpResponse, ProviderConfig
from daemon.providers.conformance import AdapterConformance, Charged, Scenario, StatusSample

from . import IN_PROGRESS, STATUSES, EchoConfig, EchoProvider, charge_result, lookup_result

API_KEY: Final = "echo_test_key_2f9c81d0"

# What the fake does with a payment, by its token.
TOKENS: Final = {
    Scenario.APPROVE: "tok_ok",
    Scenario.DECLINE: "tok_stolen",
    Scenario.FAIL_BEFORE_PROCESSING: "tok_unavailable",
    Scenario.CHARGE_THEN_HANG: "tok_hang",
}


class EchoFake:
    """Echo over real HTTP on a loopback port; ``payments`` is its book."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.base_url = ""
        self.payments: dict[str, dict[str, Any]] = {}
        self._release = asyncio.Event()  # set on close: hanging answers end

    async def charged(self, request: AttemptRequest) -> list[Charged]:
        return [
            Charged(payment["amount_minor"], payment["currency"])
            for payment in self.payments.values()
            if payment["reference"] == request.merchant_reference and payment["status"] == "approved"
        ]

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _charge(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        key = request.headers.get("Idempotency-Key")
        if not key:
            return web.json_response({"error": "Idempotency-Key is required"}, status=400)
        if key in self.payments:
            return web.json_response(self.payments[key])
        body = await request.json()
        token = body["token"]
        if token == TOKENS[Scenario.FAIL_BEFORE_PROCESSING]:
            return web.json_response({"error": "not_processed"}, status=503)
        payment = {
            "id": f"ech_{len(self.payments) + 1}",
            "status": "declined" if token == TOKENS[Scenario.DECLINE] else "approved",
            "amount_minor": body["amount_minor"],
            "currency": body["currency"],
            "reference": body["reference"],
            "decline_code": "stolen_card" if token == TOKENS[Scenario.DECLINE] else None,
        }
        self.payments[key] = payment
        if token == TOKENS[Scenario.CHARGE_THEN_HANG]:
            await self._release.wait()
        return web.json_response(payment)

    async def _by_key(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        payment = self.payments.get(request.match_info["key"])
        if payment is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(payment)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EchoFake]:
        app = web.Application()
        app.router.add_post("/charges", self._charge)
        app.router.add_get("/charges/{key}", self._by_key)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            self._release.set()
            await runner.cleanup()


def _payment(status: str) -> dict[str, Any]:
    return {
        "id": "ech_1",
        "status": status,
        "amount_minor": 1999,
        "currency": "EUR",
        "reference": "1:1",
        "decline_code": "insufficient_funds" if status == "declined" else None,
    }


class EchoConformance(AdapterConformance):
    """The kit's suite for Echo; a test module collects it as ``class TestEcho(EchoConformance)``."""

    provider_class = EchoProvider
    secrets: ClassVar = {"echo_api_key": API_KEY}

    @pytest.fixture
    async def fake(self) -> AsyncIterator[EchoFake]:
        async with EchoFake(API_KEY).running() as fake:
            yield fake

    def provider_config(self, base_url: str, *, timeout_s: float) -> ProviderConfig:
        table = {"kind": "echo", "base_url": base_url, "max_in_flight": 4, "timeout_s": timeout_s}
        return msgspec.convert(table, EchoConfig)

    async def arrange(self, fake: Any, scenario: Scenario, request: AttemptRequest) -> AttemptRequest:
        return msgspec.structs.replace(request, payment_method=TOKENS[scenario])

    def official_statuses(self) -> Iterable[StatusSample]:
        request = AttemptRequest(
            idempotency_key="k",
            subscription_id=1,
            cycle=1,
            amount_minor=1999,
            currency="EUR",
            provider="echo",
            payment_method="tok_ok",
        )
        for status in STATUSES:
            answer = HttpResponse(200, {}, json.dumps(_payment(status)).encode())
            later = lookup_result(_payment(status), request).result  # what a lookup then reads
            yield StatusSample(
                "status", status, charge_result(answer), later, in_progress=status in IN_PROGRESS
            )
