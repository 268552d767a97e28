"""The adapter in docs/providers.md ("Adding a provider") is real: installed from the page as a
package of its own, it imports only the provider API and charges over HTTP through ``HttpAdapter``.

Acme is made up for the guide; the small aiohttp server below plays it, with the
semantics the guide's adapter assumes (idempotency by key, lookup by key, 429
with Retry-After). Nothing here speaks for a real provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import msgspec
import pytest
from aiohttp import web

from daemon.models import AttemptRequest, Outcome
from daemon.providers.api import HttpAdapter, HttpResponse, Provider, ProviderConfig
from daemon.providers.conformance import AdapterConformance, Charged, Scenario, StatusSample
from tests.test_architecture import API, imported_names

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "providers.md"


def guide_module(directory: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    text = GUIDE.read_text(encoding="utf-8").split("## Adding a provider", 1)[1]
    match = re.search(r'```python\n("""payd_acme.*?)```', text, re.DOTALL)
    assert match, "the guide's adapter (a python block starting with the payd_acme docstring)"
    path = directory / "payd_acme" / "__init__.py"
    path.parent.mkdir()
    path.write_text(match.group(1), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("payd_acme", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "payd_acme", module)  # msgspec resolves annotations through it
    spec.loader.exec_module(module)
    return module


class AcmeGateway:
    """Acme over HTTP: charges stored under their idempotency key, chosen by token."""

    def __init__(self) -> None:
        self.charges: dict[str, tuple[int, dict[str, Any]]] = {}
        self.release = asyncio.Event()  # set on shutdown: hanging answers end
        self.base_url = ""

    async def charged(self, request: AttemptRequest) -> list[Charged]:
        """The kit's view of the books: approvals made for the attempt."""
        return [
            Charged(answer["amount"], answer["currency"])
            for _, answer in self.charges.values()
            if answer["reference"] == request.merchant_reference and answer["status"] == "succeeded"
        ]

    async def charge(self, request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer acme-secret"
        key = request.headers["Idempotency-Key"]
        if key not in self.charges:
            body = await request.json()
            token = body["token"]
            if token == "pm_busy":
                return web.json_response({}, status=429, headers={"Retry-After": "2"})
            if token == "pm_unavailable":  # refused before processing, nothing stored
                return web.json_response({"error": "unavailable"}, status=503)
            answer = {
                "id": f"ch_{len(self.charges) + 1}",
                "status": "succeeded",
                "amount": body["amount"],
                "currency": body["currency"],
                "reference": body["reference"],
            }
            if token == "pm_stolen":
                answer |= {"status": "declined", "decline_code": "stolen_card"}
            self.charges[key] = (200, answer)
            if token == "pm_hang":  # charged, then the answer is held back
                await self.release.wait()
        status, answer = self.charges[key]
        return web.json_response(answer, status=status)

    async def by_key(self, request: web.Request) -> web.Response:
        stored = self.charges.get(request.match_info["key"])
        if stored is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(stored[1], status=stored[0])

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[AcmeGateway]:
        app = web.Application()
        app.router.add_post("/v1/charges", self.charge)
        app.router.add_get("/v1/charges/by-key/{key}", self.by_key)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            self.release.set()
            await runner.cleanup()


@pytest.fixture
async def acme_url() -> AsyncIterator[str]:
    async with AcmeGateway().running() as gateway:
        yield gateway.base_url


def attempt(token: str, key: str) -> AttemptRequest:
    return AttemptRequest(
        idempotency_key=key, amount_minor=999, currency="EUR", provider="acme", payment_method=token
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_guide_adapter_imports_only_the_provider_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the guide tells plugin authors to write needs nothing of payd but the API."""
    guide_module(tmp_path, monkeypatch)
    path = tmp_path / "payd_acme" / "__init__.py"
    ours = {name for name in imported_names("payd_acme", path) if name.startswith("daemon")}
    assert {name.rpartition(".")[0] for name in ours} == {API}


async def test_the_guide_adapter_charges_and_looks_up_over_http(
    tmp_path: Path, acme_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built from its config table and its secret, the guide's adapter is a ``Provider``; it
    approves, declines hard by its table, passes on Retry-After, finds an earlier charge by
    key, says "not found" for one never made, and a gateway that cannot be reached comes
    back as "never sent" without any code of its own."""
    acme = guide_module(tmp_path, monkeypatch)
    monkeypatch.setenv("PAYD_ACME_API_KEY", "acme-secret")
    table = {"kind": "acme", "base_url": acme_url, "max_in_flight": 4, "merchant_id": "m_1"}
    provider = acme.AcmeProvider("acme", msgspec.convert(table, acme.AcmeConfig))
    assert isinstance(provider, Provider)
    assert isinstance(provider, HttpAdapter)
    try:
        approved = await provider.charge(attempt("pm_ok", "acme-1"))
        assert (approved.outcome, approved.provider_ref) == (Outcome.APPROVED, "ch_1")
        stolen = await provider.charge(attempt("pm_stolen", "acme-2"))
        assert (stolen.outcome, stolen.decline_code) == (Outcome.HARD_DECLINE, "stolen_card")
        busy = await provider.charge(attempt("pm_busy", "acme-3"))
        assert (busy.outcome, busy.retry_after_s) == (Outcome.RATE_LIMITED, 2.0)
        found = await provider.lookup(attempt("pm_ok", "acme-1"))
        assert found is not None and found.found and found.result == approved
        missing = await provider.lookup(attempt("pm_ok", "acme-never"))
        assert missing is not None and not missing.found
    finally:
        await provider.close()
    table["base_url"] = f"http://127.0.0.1:{free_port()}"
    unreachable = acme.AcmeProvider("acme", msgspec.convert(table, acme.AcmeConfig))
    try:
        refused = await unreachable.charge(attempt("pm_ok", "acme-4"))
        assert (refused.outcome, refused.reached_provider) == (Outcome.PROVIDER_ERROR, False)
        assert await unreachable.lookup(attempt("pm_ok", "acme-4")) is None
    finally:
        await unreachable.close()


async def test_the_guide_adapter_flags_a_charge_of_another_amount_under_its_key(
    tmp_path: Path, acme_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's lookup compares what it found with the attempt: the same key for another
    amount is an anomaly, never settled as the attempt (before, it was taken as approved)."""
    acme = guide_module(tmp_path, monkeypatch)
    monkeypatch.setenv("PAYD_ACME_API_KEY", "acme-secret")
    table = {"kind": "acme", "base_url": acme_url, "max_in_flight": 4, "merchant_id": "m_1"}
    provider = acme.AcmeProvider("acme", msgspec.convert(table, acme.AcmeConfig))
    try:
        assert (await provider.charge(attempt("pm_ok", "acme-5"))).outcome is Outcome.APPROVED
        other = msgspec.structs.replace(attempt("pm_ok", "acme-5"), amount_minor=1000)
        found = await provider.lookup(other)
        assert found is not None and found.found and found.result is None and found.anomaly
    finally:
        await provider.close()


ACME_TOKENS = {
    Scenario.APPROVE: "pm_ok",
    Scenario.DECLINE: "pm_stolen",
    Scenario.FAIL_BEFORE_PROCESSING: "pm_unavailable",
    Scenario.CHARGE_THEN_HANG: "pm_hang",
}


class TestGuideAdapterConformance(AdapterConformance):
    """The guide's adapter passes payd's conformance kit (docs/providers.md, "Conformance kit")
    against the Acme gateway above."""

    secrets: ClassVar = {"acme_api_key": "acme-secret"}
    acme: ModuleType

    @property  # type: ignore[override]
    def provider_class(self) -> Any:
        return self.acme.AcmeProvider

    @pytest.fixture
    async def fake(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AcmeGateway]:
        self.acme = guide_module(tmp_path, monkeypatch)
        async with AcmeGateway().running() as gateway:
            yield gateway

    def provider_config(self, base_url: str, *, timeout_s: float) -> ProviderConfig:
        table = {"kind": "acme", "base_url": base_url, "max_in_flight": 4, "timeout_s": timeout_s}
        return msgspec.convert(table | {"merchant_id": "m_1"}, self.acme.AcmeConfig)

    async def arrange(self, fake: Any, scenario: Scenario, request: AttemptRequest) -> AttemptRequest:
        return msgspec.structs.replace(request, payment_method=ACME_TOKENS[scenario])

    def official_statuses(self) -> Iterable[StatusSample]:
        # Acme's statuses: the guide's wire type lists them (``AcmeCharge.status``).
        for status in ("succeeded", "declined"):
            body = {"id": "ch_1", "status": status, "amount": 1, "currency": "EUR", "reference": "r"}
            answer = HttpResponse(200, {}, json.dumps(body).encode())
            result = self.acme.charge_result(answer)
            yield StatusSample("status", status, result, result)
