"""The locust load test runs headless against a real daemon and reports payd's own outcomes:
every attempt it published comes back from ``payd.events`` as a locust request, named by
outcome, and locust's CSV agrees with the sandbox gateway's ledger.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiomysql

from tests.support import NAMESPACE, ROOT, Broker, DaemonFactory, Sandbox

LOCUST = str(Path(sys.executable).with_name("locust"))
RUN_S = 8
# Declines are payd working as it should; none of these tokens can fail or time out.
TOKENS = "pm_ok=8,pm_insufficient_funds=1,pm_stolen=1"
OUTCOME_OF_TOKEN = {"pm_ok": "approved", "pm_insufficient_funds": "soft_decline", "pm_stolen": "hard_decline"}


def read_json(path: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(path.read_text())
    return entries


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


async def test_headless_locust_run_reports_payd_outcomes(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """5 users for 8 s: attempt rows in the CSV by outcome, no failure at all (pm_ok never
    fails), and as many approvals as the gateway's ledger shows for locust's keys."""
    await sandbox.behave(latency_ms=20)
    daemon = await daemons.process(rabbitmq={"prefetch": 200})
    prefix = tmp_path / "run"
    # The subprocess must not block this event loop: the sandbox answers from it.
    locust = await asyncio.create_subprocess_exec(
        LOCUST,
        "-f",
        str(ROOT / "load" / "locustfile.py"),
        "--headless",
        "-u",
        "5",
        "-r",
        "5",
        "-t",
        f"{RUN_S}s",
        "--csv",
        str(prefix),
        # The CSV is rewritten once a second, so its last rewrite can miss the final events on a
        # busy machine; the JSON file is written at exit from the final numbers.
        "--json-file",
        str(prefix),  # locust adds ".json"
        "--payd-namespace",
        NAMESPACE,
        "--payd-tokens",
        TOKENS,
        "--payd-rate",
        "4",
        "--payd-timeout",
        "20",
        "--payd-drain",
        "20",
        # A sender stopped mid-publish may have had its message accepted by the broker but
        # not yet tracked; letting each finish its task keeps locust's count equal to the ledger's.
        "--stop-timeout",
        "10",
        "--loglevel",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=os.environ.copy(),
        cwd=ROOT,
    )
    try:
        output, _ = await asyncio.wait_for(locust.communicate(), timeout=RUN_S + 60)
    except TimeoutError:
        locust.kill()
        await locust.wait()
        raise AssertionError(f"locust did not finish; daemon log:\n{daemon.log()}") from None
    text = output.decode(errors="replace")
    assert locust.returncode == 0, f"locust exited {locust.returncode}:\n{text[-4000:]}"

    stats = read_csv(Path(f"{prefix}_stats.csv"))
    attempts = {row["Name"]: row for row in stats if row["Type"] == "attempt"}
    assert attempts, f"no attempt rows in the CSV:\n{text[-3000:]}"
    assert set(attempts) <= set(OUTCOME_OF_TOKEN.values()), attempts.keys()
    final = read_json(Path(f"{prefix}.json"))
    requests = {entry["name"]: int(entry["num_requests"]) for entry in final if entry["method"] == "attempt"}
    assert set(requests) <= set(OUTCOME_OF_TOKEN.values()), requests.keys()
    assert all(int(entry["num_failures"]) == 0 for entry in final), final
    assert requests.get("approved", 0) > 0
    assert all(int(row["Failure Count"]) == 0 for row in stats), stats
    assert read_csv(Path(f"{prefix}_failures.csv")) == []
    assert float(attempts["approved"]["Median Response Time"]) > 0

    # locust's numbers are payd's: one approval per approved attempt at the gateway.
    approved = await sandbox.assert_no_double_charge()
    from_locust = [c for c in approved if c["idempotency_key"].startswith("locust-")]
    # Every approval locust counted was charged once. A sender stopped at the end of the run may
    # have had a publish accepted by the broker and not yet counted: at most one per user.
    assert requests["approved"] <= len(from_locust) <= requests["approved"] + 5
    # 5 users x 4/s x 8 s is 160 at most; well over half of it is expected even on a slow box.
    assert 40 <= sum(requests.values()) <= 5 * 4 * RUN_S + 5
