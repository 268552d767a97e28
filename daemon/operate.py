"""``payd halt``, ``payd resume``, ``payd status`` and ``payd attempts unpark``: operating a running fleet."""

from __future__ import annotations

import getpass
import json
import socket
import sys
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import redis.exceptions

from daemon.config import Config
from daemon.halt import HaltKeys, clear_halt, set_halt
from daemon.redis_errors import REDIS_ERRORS
from daemon.redis_link import redis_address, redis_client
from daemon.secrets import load_secret


def _redis(config: Config) -> aioredis.Redis:
    return redis_client(config.redis, load_secret("redis_password"))


async def halt(config: Config, *, provider: str | None, reason: str) -> int:
    if provider is not None and provider not in config.providers:
        print(
            f"payd halt: unknown provider {provider!r}; configured: {', '.join(config.providers)}",
            file=sys.stderr,
        )
        return 2
    client = _redis(config)
    try:
        await set_halt(
            client,
            HaltKeys(config.redis.key_prefix),
            provider=provider,
            reason=reason,
            by=f"{getpass.getuser()}@{socket.gethostname()}",
        )
    except REDIS_ERRORS as error:
        print(f"payd halt: could not reach Redis at {redis_address(config.redis)}: {error}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
    target = f"provider {provider}" if provider else "every provider"
    print(f"halted {target}: no instance starts a new call within a second; calls in flight finish")
    return 0


async def resume(config: Config, *, provider: str | None) -> int:
    client = _redis(config)
    try:
        was_halted = await clear_halt(client, HaltKeys(config.redis.key_prefix), provider=provider)
    except (redis.exceptions.RedisError, OSError) as error:
        where = redis_address(config.redis)
        print(f"payd resume: could not reach Redis at {where}: {error}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
    target = f"provider {provider}" if provider else "the global halt"
    print(f"resumed {target}" if was_halted else f"{target} was not halted")
    return 0


async def status(config: Config, *, as_json: bool) -> int:
    """Read the running instance's /status (the one this configuration describes)."""
    url = f"http://{config.http.host}:{config.http.port}/status"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(url) as response,
        ):
            snapshot = await response.json()
    except (aiohttp.ClientError, TimeoutError) as error:
        print(f"payd status: no daemon answering at {url}: {error}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(snapshot, indent=2))
        return 0
    print(f"instance   {snapshot['instance_id']}  up {snapshot['uptime_s']} s")
    print(f"in flight  {snapshot['in_flight']}")
    print(f"ready      {json.dumps(snapshot['ready'])}")
    print(f"draining   {snapshot['draining']}")
    node = snapshot.get("broker_node") or "disconnected"
    print(f"broker     {node}  reconnects={snapshot['broker_reconnects']}")
    _print_halt(snapshot["halt"])
    _print_duties(snapshot.get("duties", {}))
    parked = snapshot.get("parked_attempts", {}).get("fleet", 0)
    print(f"parked     {parked} unknown attempts wait for an operator")
    print(f"{'provider':<16}{'in flight':>10}{'limit':>7}{'waiting':>9}  breaker    halted")
    for name, lane in snapshot["providers"].items():
        print(
            f"{name:<16}{lane['in_flight']:>10}{lane['limit']:>7}{lane['waiting']:>9}  "
            f"{lane['breaker']:<10} {'yes' if lane['halted'] else 'no'}"
        )
    return 0


def _print_halt(halt: dict[str, Any]) -> None:
    """The halt as this instance knows it, and how well: an unknown state stops every call."""
    halted = sorted(halt.get("providers", {}))
    age = halt.get("last_read_age_s")
    read = "never read" if age is None else f"last read {age} s ago"
    state = "known" if halt.get("known") else "UNKNOWN: no provider is called"
    print(
        f"halt       global={'yes' if halt['global'] else 'no'}  "
        f"providers={','.join(halted) if halted else 'none'}  state={state}  {read}  "
        f"stale={halt['stale']}  read errors={halt.get('read_errors', 0)}"
    )
    if halt.get("last_error"):
        print(f"halt error {halt['last_error']}")


def _print_duties(duties: dict[str, dict[str, Any]]) -> None:
    """Every background duty: its state, and why it last crashed."""
    print(f"{'duty':<20}{'state':<12}{'critical':<10}{'crashes':>8}  last error")
    for name, duty in duties.items():
        print(
            f"{name:<20}{duty['state']:<12}{'yes' if duty.get('critical') else 'no':<10}"
            f"{duty.get('crashes', 0):>8}  {duty.get('last_error') or '-'}"
        )


async def unpark(config: Config, keys: list[str], *, every: bool) -> int:
    """``payd attempts unpark``: parked attempts and refunds go back to automatic reconciliation."""
    from daemon.storage.attempts import unpark_attempts  # noqa: PLC0415 (keep halt/resume light)
    from daemon.storage.db import close_pool, open_pool  # noqa: PLC0415
    from daemon.storage.reversals import unpark_reversals  # noqa: PLC0415

    if bool(keys) == every:
        print("payd attempts unpark: name idempotency keys, or --all", file=sys.stderr)
        return 2
    pool = await open_pool(config.mysql, load_secret("mysql_password"))
    try:
        found = await unpark_attempts(pool, None if every else keys)
        refunds = await unpark_reversals(pool, None if every else keys)
    finally:
        await close_pool(pool)
    for key in found:
        print(f"unparked {key}: looked up again at the next reconciliation pass")
    for key in refunds:
        print(f"unparked refund {key}: looked up again at the next reconciliation pass")
    missing = sorted(set(keys) - set(found) - set(refunds))
    for key in missing:
        print(f"payd attempts unpark: {key} is not a parked unknown attempt or refund", file=sys.stderr)
    return 1 if missing else 0
