"""The control endpoint: /healthz, /readyz, /metrics, /status on localhost by default."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from daemon.broker import Broker
from daemon.metrics import Metrics
from daemon.pipeline.attempts import AttemptPipeline


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
    ) -> None:
        self.instance_id = instance_id
        self.broker = broker
        self.pipeline = pipeline
        self.metrics = metrics
        self.database_ok = database_ok
        self.started = time.time()

    def readiness(self) -> dict[str, bool]:
        return {
            "broker_connected": self.broker.connected.is_set(),
            "database_ok": self.database_ok(),
            "not_draining": not self.pipeline.stopping.is_set(),
        }

    def status(self) -> dict[str, Any]:
        lanes = self.pipeline.lanes
        return {
            "instance_id": self.instance_id,
            "uptime_s": round(time.time() - self.started, 1),
            "draining": self.pipeline.stopping.is_set(),
            "ready": self.readiness(),
            "in_flight": self.pipeline.in_flight,
            "broker_reconnects": self.broker.reconnects,
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
                    "peak_in_flight": lane.limiter.peak,
                    "breaker": lane.breaker.state.name.lower(),
                    "breaker_trips": lane.breaker.trips,
                    "paused_for_s": round(max(0.0, lane.paused_until - time.monotonic()), 3),
                }
                for name, lane in lanes.items()
            },
        }


def build_control_app(state: ControlState) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the event loop turns.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = state.readiness()
        return web.json_response(
            {"ready": all(checks.values()), "checks": checks},
            status=200 if all(checks.values()) else 503,
        )

    async def metrics(_: web.Request) -> web.Response:
        for name, lane in state.pipeline.lanes.items():
            state.metrics.limit.labels(name).set(lane.limiter.limit)
            state.metrics.waiting.labels(name).set(lane.limiter.waiting)
            state.metrics.breaker_state.labels(name).set(int(lane.breaker.state))
            state.metrics.breaker_trips.labels(name).set(lane.breaker.trips)
        state.metrics.draining.set(1 if state.pipeline.stopping.is_set() else 0)
        state.metrics.broker_connected.set(1 if state.broker.connected.is_set() else 0)
        body = await asyncio.to_thread(state.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_: web.Request) -> web.Response:
        return web.json_response(state.status())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    return app


async def start_control(state: ControlState, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(build_control_app(state), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
