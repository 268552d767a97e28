"""The control endpoint: /healthz, /readyz, /metrics, /status on localhost by default; /webhooks/{provider}.

``/admin/*`` is a sub-application behind one middleware: the bearer token
(compared in constant time, as bytes), and a clear 503 when the halt store
cannot be reached or refuses the command. No handler checks for itself.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.broker import Broker
from daemon.halt import HaltState, clear_halt, set_halt
from daemon.metrics import Metrics
from daemon.operator.http import REFUND_ROUTE, OperatorTools, register_operator_routes
from daemon.pipeline.attempts import AttemptPipeline
from daemon.redis_errors import REDIS_ERRORS
from daemon.secrets import Secret
from daemon.supervisor import Supervisor
from daemon.webhooks import WebhookReceiver

log = structlog.get_logger("payd.control")

ADMIN_TIMEOUT_S = 5.0
"""An admin action that Redis has not answered by then gets a 503, not a hung request."""


class ControlState:
    """What the endpoint reports on; each part is owned elsewhere and only read here."""

    def __init__(
        self,
        *,
        instance_id: str,
        broker: Broker,
        pipeline: AttemptPipeline,
        metrics: Metrics,
        database_ok: Callable[[], bool],
        duties: Supervisor,
        parked: Callable[[], dict[str, Any]],
        halt: HaltState,
        redis: aioredis.Redis,
        control_token: Secret | None,
        operator: OperatorTools | None = None,
        webhooks: WebhookReceiver | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.broker = broker
        self.pipeline = pipeline
        self.metrics = metrics
        self.database_ok = database_ok
        self.duties = duties
        self.parked = parked
        self.halt = halt
        self.redis = redis
        self.control_token = control_token
        self.operator = operator
        self.webhooks = webhooks
        self.started = time.time()
        metrics.registry.register(LiveStateCollector(self))

    def readiness(self) -> dict[str, bool]:
        return {
            "broker_connected": self.broker.connected.is_set(),
            "database_ok": self.database_ok(),
            "not_draining": not self.pipeline.stopping.is_set(),
            "halt_state_fresh": self.halt.fresh(),
            "duties_ok": self.duties.ready,
        }

    def unready_reasons(self) -> dict[str, str]:
        """Why a failing check fails, where there is more to say than its name."""
        return {"halt_state_fresh": self.halt.describe()} if not self.halt.fresh() else {}

    def status(self) -> dict[str, Any]:
        lanes = self.pipeline.lanes
        return {
            "instance_id": self.instance_id,
            "uptime_s": round(time.time() - self.started, 1),
            "draining": self.pipeline.stopping.is_set(),
            "ready": self.readiness(),
            "in_flight": self.pipeline.in_flight,
            "halt": self.halt.snapshot(),
            "duties": self.duties.snapshot(),
            "parked_attempts": msgspec.to_builtins(self.parked()),
            "broker_reconnects": self.broker.reconnects,
            "broker_node": self.broker.node,
            "broker_nodes": list(self.broker.nodes),
            # Set by ``payd run`` before intake (daemon/runtime.py); Python's defaults otherwise.
            "gc": {"frozen_objects": gc.get_freeze_count(), "thresholds": list(gc.get_threshold())},
            "counters": {
                name: getattr(self.pipeline.counters, name)
                for name in self.pipeline.counters.__struct_fields__
            },
            "providers": {
                name: {
                    "kind": lane.config.kind,
                    "limit": lane.limiter.limit,
                    "in_flight": lane.limiter.in_flight,
                    "waiting": lane.limiter.waiting,
                    "held": lane.limiter.held,
                    "peak_in_flight": lane.limiter.peak,
                    "halted": self.halt.blocks(name),
                    "breaker": lane.breaker.state.name.lower(),
                    "breaker_trips": lane.breaker.trips,
                    "paused_for_s": round(max(0.0, lane.paused_until - time.monotonic()), 3),
                }
                for name, lane in lanes.items()
            },
        }


class LiveStateCollector(Collector):
    """Gauges of state owned elsewhere, read when Prometheus scrapes rather than copied into
    gauges on the way: a scrape by any registry client sees the state of that moment.

    ``collect`` runs in the render thread: it reads plain attributes and copies the
    lanes before iterating (a reload may change them on the loop meanwhile).
    """

    def __init__(self, state: ControlState) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._state
        lanes = list(state.pipeline.lanes.items())
        limit = GaugeMetricFamily("payd_provider_limit", "Configured in-flight limit", labels=["provider"])
        waiting = GaugeMetricFamily(
            "payd_provider_waiting", "Attempts waiting for a provider slot", labels=["provider"]
        )
        breaker = GaugeMetricFamily(
            "payd_provider_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            labels=["provider"],
        )
        trips = GaugeMetricFamily(
            "payd_provider_breaker_trips", "Times the breaker opened since start", labels=["provider"]
        )
        halted = GaugeMetricFamily(
            "payd_halted",
            "1 while new calls to this provider are halted (global or per provider)",
            labels=["provider"],
        )
        for name, lane in lanes:
            limit.add_metric([name], lane.limiter.limit)
            waiting.add_metric([name], lane.limiter.waiting)
            breaker.add_metric([name], int(lane.breaker.state))
            trips.add_metric([name], lane.breaker.trips)
            halted.add_metric([name], 1 if state.halt.blocks(name) else 0)
        yield from (limit, waiting, breaker, trips, halted)
        yield GaugeMetricFamily(
            "payd_halt_state_stale",
            "1 while the last read of the halt keys failed (the last state is kept for halt_grace_s)",
            value=1 if state.halt.stale else 0,
        )
        yield GaugeMetricFamily(
            "payd_halt_state_unknown",
            "1 while the halt keys have not been read for longer than halt_grace_s: no provider is called",
            value=0 if state.halt.known() else 1,
        )
        yield GaugeMetricFamily(
            "payd_draining", "1 while the daemon drains", value=1 if state.pipeline.stopping.is_set() else 0
        )
        yield GaugeMetricFamily(
            "payd_broker_connected",
            "1 while connected to RabbitMQ",
            value=1 if state.broker.connected.is_set() else 0,
        )
        nodes = GaugeMetricFamily(
            "payd_broker_node_info", "1 for the RabbitMQ node in use, 0 for the other nodes", labels=["node"]
        )
        for node in state.broker.nodes:
            nodes.add_metric([node], 1 if node == state.broker.node else 0)
        yield nodes


class AdminOrder(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    provider: str | None = None
    reason: str = "halted through the control endpoint"


def _decode_admin(body: bytes) -> AdminOrder | str:
    try:
        return msgspec.json.decode(body or b"{}", type=AdminOrder)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        return f"invalid body: {error}"


def build_control_app(state: ControlState) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the event loop turns.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = state.readiness()
        body: dict[str, object] = {"ready": all(checks.values()), "checks": checks}
        if reasons := state.unready_reasons():
            body["reasons"] = reasons
        return web.json_response(body, status=200 if all(checks.values()) else 503)

    async def metrics(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(state.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_: web.Request) -> web.Response:
        return web.json_response(state.status())

    async def admin_halt(request: web.Request) -> web.Response:
        order = _decode_admin(await request.read())
        if isinstance(order, str):
            return web.json_response({"error": order}, status=400)
        if order.provider is not None and order.provider not in state.pipeline.lanes:
            return web.json_response({"error": f"unknown provider {order.provider!r}"}, status=400)
        await set_halt(
            state.redis,
            state.halt.keys,
            provider=order.provider,
            reason=order.reason,
            by=f"control:{state.instance_id}",
        )
        return web.json_response({"halted": order.provider or "all"})

    async def admin_resume(request: web.Request) -> web.Response:
        order = _decode_admin(await request.read())
        if isinstance(order, str):
            return web.json_response({"error": order}, status=400)
        cleared = await clear_halt(state.redis, state.halt.keys, provider=order.provider)
        return web.json_response({"resumed": order.provider or "all", "was_halted": cleared})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    if state.webhooks is not None:  # providers' notifications: verified by each adapter, no token
        state.webhooks.register(app)
    admin = web.Application(middlewares=[_admin_guard(state.control_token)])
    admin.router.add_post("/halt", admin_halt)
    admin.router.add_post("/resume", admin_resume)
    if state.operator is not None:
        register_operator_routes(admin, state.operator)
    app.add_subapp("/admin/", admin)
    return app


def token_matches(given: bytes, token: Secret | None) -> bool:
    """Constant-time comparison of what a client sent with the control token, as bytes: any
    byte sequence is an answer (a wrong one), never an error. No token configured: no match."""
    return token is not None and hmac.compare_digest(given, token.reveal().encode())


def _admin_guard(token: Secret | None) -> Middleware:
    """The one place admin requests are authorised and Redis failures become a clear 503."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives the bytes back.
        given = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "surrogateescape")
        scheme, _, credential = given.partition(b" ")
        if scheme.lower() != b"bearer" or not token_matches(credential.strip(), token):
            log.warning("control.unauthorised", path=request.path, remote=request.remote)
            return web.json_response(
                {"error": "a valid bearer token is required"},
                status=401,
                headers={hdrs.WWW_AUTHENTICATE: "Bearer"},
            )
        try:
            # The refund route bounds each of its steps itself: a timeout here could fire after
            # the broker confirmed its publish, and the caller, told 500, would ask again.
            bounded = request.match_info.route.name != REFUND_ROUTE
            async with asyncio.timeout(ADMIN_TIMEOUT_S if bounded else None):
                response = await handler(request)
        except TimeoutError:
            # The guard's own bound, or a database round trip's: not the halt store's fault.
            log.error("control.admin_timeout", path=request.path, timeout_s=ADMIN_TIMEOUT_S)
            return web.json_response(
                {
                    "error": "the request did not finish in time (the database, the broker or Redis "
                    "is slow or not answering)",
                    "changed": "unknown: check with payd status or payd attempts show, and retry",
                },
                status=503,
                headers={hdrs.RETRY_AFTER: "1"},
            )
        except REDIS_ERRORS as error:
            log.error("control.redis_failed", path=request.path, error=f"{type(error).__name__}: {error}")
            return web.json_response(
                {
                    "error": f"the halt store (Redis) failed: {type(error).__name__}: {error}",
                    "changed": "unknown: check with payd status once Redis answers, and retry",
                },
                status=503,
                headers={hdrs.RETRY_AFTER: "1"},
            )
        return response

    return guard


async def start_control(state: ControlState, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(build_control_app(state), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
