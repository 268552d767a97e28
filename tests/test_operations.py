"""Living with a running daemon: SIGHUP reload and the aiomonitor console, over real connections."""

from __future__ import annotations

import re
import signal

import aiohttp
import aiomysql
import redis.asyncio as aioredis

from daemon.halt import HaltKeys
from daemon.secrets import load_secret
from tests.faults.console import logged_in_console
from tests.support import NAMESPACE, Broker, DaemonFactory, Sandbox, eventually, free_port


async def test_sighup_applies_live_keys_and_keeps_running_on_a_bad_file(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A new in-flight limit applies on SIGHUP; a file that no longer validates changes nothing
    and the daemon keeps running; a key that needs a restart is reported, not applied."""
    daemon = await daemons.process(providers__sandbox={"max_in_flight": 7})
    path = next(daemons.workdir.glob(f"payd-{daemon.port}.toml"))
    original = path.read_text()
    assert (await daemon.status())["providers"]["sandbox"]["limit"] == 7

    path.write_text(
        original.replace("max_in_flight = 7", "max_in_flight = 13").replace("prefetch = 500", "prefetch = 9")
    )
    daemon.signal(signal.SIGHUP)

    async def limit_is(value: int) -> bool:
        return (await daemon.status())["providers"]["sandbox"]["limit"] == value

    await eventually(lambda: limit_is(13), timeout=10, what="the new limit")
    assert "rabbitmq.prefetch" in daemon.log(), "a restart-only key is reported"

    path.write_text(original.replace("max_in_flight = 7", "max_in_flight = 0"))
    daemon.signal(signal.SIGHUP)
    await eventually(lambda: _contains(daemon.log(), "reload.rejected"), timeout=10, what="the rejection")
    assert "providers.sandbox.max_in_flight" in daemon.log()
    assert await limit_is(13), "the running configuration stayed"
    assert daemon.process.poll() is None


async def _contains(text: str, needle: str) -> bool:
    return needle in text


async def test_aiomonitor_commands_answer_over_a_real_connection(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """After logging in with the control token: `providers` shows the lanes; `limit` changes one;
    `halt`/`resume` write the fleet-wide key."""
    port = free_port()
    token = load_secret("control_token")
    assert token is not None
    redis = aioredis.from_url("redis://127.0.0.1:6379/0")
    await redis.delete(HaltKeys(NAMESPACE).provider_key("sandbox"))
    async with daemons.in_process(monitor={"enabled": True, "port": port}) as daemon:
        console = await logged_in_console(port, token.reveal())
        table = await console.send("providers", "draining:")
        assert re.search(r"\| sandbox\s+\| 50\s+\|", table), table
        assert "in flight 1" not in table
        await console.send("limit sandbox 9", "in-flight limit 9")
        assert (await daemon.status())["providers"]["sandbox"]["limit"] == 9
        await console.send("halt --provider sandbox --reason from-test", "halted")
        assert b"from-test" in (await redis.get(HaltKeys(NAMESPACE).provider_key("sandbox")) or b"")
        await console.send("resume --provider sandbox", "resumed")
        assert await redis.get(HaltKeys(NAMESPACE).provider_key("sandbox")) is None
        console.close()
    await redis.aclose()


async def test_backlog_metrics_show_unknown_attempts_and_queue_depth(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """/metrics reports the unknown backlog (may have charged) and the dead-letter depth."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    from tests.support import request  # noqa: PLC0415

    await sandbox.behave(hang_s=30)
    async with daemons.in_process(
        providers__sandbox={"timeout_s": 0.5}, pipeline={"reconcile_backoff_s": [60]}
    ) as daemon:
        await broker.publish([request("unk-1", payment_method="pm_timeout"), b"not json"])

        async def scraped() -> dict[str, float]:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{daemon.port}/metrics") as response,
            ):
                text = await response.text()
            return {
                sample.name + str(sorted(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }

        async def visible() -> bool:
            samples = await scraped()
            dead = samples.get(f"payd_queue_messages[('queue', '{NAMESPACE}.attempts.dead')]", 0)
            return samples.get("payd_unknown_attempts[]") == 1 and dead == 1

        await eventually(visible, timeout=20, what="the backlog in /metrics")


async def test_declines_by_code_and_provider_waits_reach_metrics(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """Operators see declines by the provider's code and how long attempts waited for a slot."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    from tests.support import request, wait_settled  # noqa: PLC0415

    async with daemons.in_process() as daemon:
        tokens = {"d-1": "pm_stolen", "d-2": "pm_stolen", "d-3": "pm_insufficient_funds", "d-4": "pm_ok"}
        await broker.publish(request(key, payment_method=token) for key, token in tokens.items())
        await wait_settled(db, ["d-1", "d-2", "d-3", "d-4"])
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{daemon.port}/metrics") as response,
        ):
            families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    declines = {
        s.labels["decline_code"]: s.value
        for s in families["payd_declines"].samples
        if s.name.endswith("_total")
    }
    assert declines == {"stolen_card": 2, "insufficient_funds": 1}
    waits = [s for s in families["payd_provider_wait_seconds"].samples if s.name.endswith("_count")]
    assert [s.value for s in waits] == [4]
