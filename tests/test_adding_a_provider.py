"""The adapter in docs/providers.md ("Adding a provider") is real: installed from the page as a
package of its own, it imports only the provider API and charges over HTTP through ``HttpAdapter``.

Acme is made up for the guide; the small aiohttp server below plays it, with the
semantics the guide's adapter assumes (idempotency by key, lookup by key, 429
with Retry-After). Nothing here speaks for a real provider.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
from aiohttp import web

from daemon.models import AttemptRequest, Outcome
from daemon.providers.api import HttpAdapter, Provider
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


def acme_gateway() -> web.Application:
    charges: dict[str, tuple[int, dict[str, Any]]] = {}

    async def charge(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer acme-secret"
        key = request.headers["Idempotency-Key"]
        if key not in charges:
            body = await request.json()
            token = body["token"]
            if token == "pm_busy":
                return web.json_response({}, status=429, headers={"Retry-After": "2"})
            answer = {"id": f"ch_{len(charges) + 1}", "status": "succeeded"}
            if token == "pm_stolen":
                answer = {"id": f"ch_{len(charges) + 1}", "status": "declined", "decline_code": "stolen_card"}
            charges[key] = (200, answer)
        status, answer = charges[key]
        return web.json_response(answer, status=status)

    async def by_key(request: web.Request) -> web.Response:
        stored = charges.get(request.match_info["key"])
        if stored is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(stored[1], status=stored[0])

    app = web.Application()
    app.router.add_post("/v1/charges", charge)
    app.router.add_get("/v1/charges/by-key/{key}", by_key)
    return app


@pytest.fixture
async def acme_url() -> AsyncIterator[str]:
    runner = web.AppRunner(acme_gateway())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


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
