"""/metrics tells operators what happened: counters scraped over HTTP from a live daemon
match what the sandbox gateway and the broker saw, gauges show saturation while it lasts,
and the dashboard and alert rules in ops/ only name metrics the daemon really exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support import ROOT, Broker, DaemonFactory, Sandbox, eventually, query, request, wait_settled

OUTCOME_OF_TOKEN = {
    "pm_ok": "approved",
    "pm_insufficient_funds": "soft_decline",
    "pm_stolen": "hard_decline",
    "pm_error": "provider_error",
    "pm_rate_limited": "rate_limited",
}
DASHBOARD = ROOT / "ops" / "grafana" / "payd.json"
ALERTS = ROOT / "ops" / "prometheus" / "payd-alerts.yml"
ALERT_TESTS = ROOT / "ops" / "prometheus" / "payd-alerts.test.yml"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "summary": ("", "_count", "_sum", "_created"),
}


class Scrape:
    """One parsed /metrics response."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples: list[Sample] = [s for family in self.families for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        found: dict[str, float] = {}
        for s in self.samples:
            if s.name == name:
                found[s.labels[label]] = found.get(s.labels[label], 0) + s.value
        return found

    def names(self) -> set[str]:
        """Every series name a query may use, including families that have no sample yet."""
        names = {s.name for s in self.samples} | {family.name for family in self.families}
        for family in self.families:
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        return names


async def scrape(port: int) -> Scrape:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(await response.text())


async def test_counters_match_what_the_gateway_and_the_broker_saw(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """A burst of attempts with every deterministic outcome, duplicates and invalid
    messages: each counter moved by exactly what happened, per provider and outcome."""
    await sandbox.behave(retry_after_s=0)
    tokens = [*["pm_ok"] * 6, "pm_insufficient_funds", "pm_stolen", "pm_error", "pm_rate_limited"]
    valid = [request(f"m-{i}", payment_method=tokens[i % len(tokens)]) for i in range(200)]
    duplicates = valid[::7]
    invalid = [b"{broken", json.dumps({**request("m-bad"), "currency": "eur"}).encode(), b"[]"]
    await broker.follow_events()
    async with daemons.in_process(rabbitmq={"prefetch": 100}) as daemon:
        await broker.publish([*valid, *invalid])
        await wait_settled(db, [r["idempotency_key"] for r in valid])
        await broker.publish(duplicates)

        async def all_accounted() -> bool:
            current = await scrape(daemon.port)
            return (
                current.value("payd_messages_total", result="duplicate") >= len(duplicates)
                and current.value("payd_dead_lettered_total") >= len(invalid)
                and current.value("payd_outbox_published_total") >= len(valid)
                and len({e["idempotency_key"] for e in broker.events}) >= len(valid)
            )

        await eventually(all_accounted, timeout=30, what="duplicates, dead letters and events counted")
        metrics = await scrape(daemon.port)
        provider_config = daemon.config.providers["sandbox"]

    token_count = Counter(r["payment_method"] for r in valid)
    expected = {OUTCOME_OF_TOKEN[token]: count for token, count in token_count.items()}
    assert metrics.by_label("payd_attempts_total", "outcome") == expected
    assert metrics.by_label("payd_attempts_total", "provider") == {"sandbox": len(valid)}
    approved = await sandbox.assert_no_double_charge()
    assert metrics.value("payd_attempts_total", provider="sandbox", outcome="approved") == len(approved)

    assert metrics.value("payd_attempt_seconds_count", provider="sandbox") == len(valid)
    assert metrics.value("payd_attempt_seconds_bucket", provider="sandbox", le="+Inf") == len(valid)
    # Errors and 429s charged nothing and are tried again with the same key, up to their limits.
    calls_per_attempt = {
        "pm_error": provider_config.max_tries,
        "pm_rate_limited": provider_config.max_rate_limited_tries,
    }
    calls = sum(calls_per_attempt.get(token, 1) * count for token, count in token_count.items())
    assert (await sandbox.stats())["requests"] == calls
    assert metrics.value("payd_provider_call_seconds_count", provider="sandbox") == calls
    assert metrics.value("payd_provider_rate_limited_total", provider="sandbox") == (
        token_count["pm_rate_limited"] * provider_config.max_rate_limited_tries
    )

    assert metrics.value("payd_messages_total", result="processed") == len(valid)
    assert metrics.value("payd_messages_total", result="duplicate") == len(duplicates)
    assert metrics.value("payd_messages_total", result="dead_lettered") == len(invalid)
    assert metrics.value("payd_messages_total", result="released") == 0
    assert metrics.value("payd_dead_lettered_total") == len(invalid)
    assert len(await broker.dead_letters()) == len(invalid)

    assert metrics.value("payd_batch_size_sum", stage="record") == len(valid)
    assert metrics.value("payd_batch_size_sum", stage="claim") >= len(valid)
    record_batches = metrics.value("payd_batch_size_count", stage="record")
    assert 1 <= record_batches <= len(valid)
    assert metrics.value("payd_batch_seconds_count", stage="record") == record_batches
    assert metrics.value("payd_batch_errors_total") == 0, metrics.by_label("payd_batch_errors_total", "stage")

    events = {e["event_id"] for e in broker.events}
    assert len(events) == len(valid), "one event per attempt"
    assert metrics.value("payd_outbox_published_total") >= len(events)
    assert metrics.value("payd_outbox_lag_seconds") < 5
    # One lag observation per confirmed outbox row, each fresh (written moments earlier).
    assert metrics.value("payd_outbox_event_lag_seconds_count") == metrics.value(
        "payd_outbox_published_total"
    )
    assert metrics.value("payd_outbox_event_lag_seconds_bucket", le="60.0") == metrics.value(
        "payd_outbox_published_total"
    )

    assert metrics.value("payd_provider_in_flight", provider="sandbox") == 0
    assert metrics.value("payd_provider_waiting", provider="sandbox") == 0
    assert metrics.value("payd_provider_limit", provider="sandbox") == 50
    assert metrics.value("payd_provider_breaker_state", provider="sandbox") == 0, "closed"
    assert metrics.value("payd_provider_breaker_trips", provider="sandbox") == 0
    assert metrics.value("payd_halted", provider="sandbox") == 0
    assert metrics.value("payd_halt_state_stale") == 0
    assert metrics.value("payd_broker_connected") == 1
    assert metrics.value("payd_draining") == 0
    assert metrics.value("payd_reconciled_total") == 0
    assert metrics.value("payd_leases_expired_total") == 0
    assert metrics.value("payd_stale_settles_total") == 0


async def test_saturation_shows_in_flight_at_the_limit_and_attempts_waiting(
    db: aiomysql.Pool, broker: Broker, sandbox: Sandbox, daemons: DaemonFactory
) -> None:
    """While a slow provider is saturated, /metrics shows in-flight calls at the configured
    limit and the attempts queued behind it; once done, both fall back to zero. A second per
    charge keeps the saturated window ten seconds wide, so a busy machine's slow intake still
    has attempts waiting while all four slots are taken."""
    await sandbox.behave(latency_ms=1000)
    async with daemons.in_process(providers__sandbox={"max_in_flight": 4}) as daemon:
        await broker.publish(request(f"sat-{i}") for i in range(40))
        seen: list[Scrape] = []

        async def saturated() -> bool:
            seen.append(await scrape(daemon.port))
            return (
                seen[-1].value("payd_provider_in_flight", provider="sandbox") == 4
                and seen[-1].value("payd_provider_waiting", provider="sandbox") > 0
            )

        await eventually(saturated, timeout=20, what="the provider to be saturated", interval=0.05)
        assert seen[-1].value("payd_provider_limit", provider="sandbox") == 4
        await wait_settled(db, [f"sat-{i}" for i in range(40)])

        # The database shows a batch's commit a moment before the daemon's coroutine resumes
        # from it and counts the batch: a scrape in between sees the counter one batch short.
        async def all_counted() -> bool:
            return (await scrape(daemon.port)).value("payd_attempts_total", outcome="approved") == 40

        await eventually(all_counted, timeout=20, what="every approval counted")
        after = await scrape(daemon.port)
    assert all(s.value("payd_provider_in_flight", provider="sandbox") <= 4 for s in seen)
    assert after.value("payd_provider_in_flight", provider="sandbox") == 0
    assert after.value("payd_provider_waiting", provider="sandbox") == 0
    assert after.value("payd_attempts_total", outcome="approved") == 40


async def test_outbox_lag_is_true_while_the_relay_is_behind(
    db: aiomysql.Pool, broker: Broker, daemons: DaemonFactory
) -> None:
    """A backlog of events ten minutes old, published one per batch: the relay stays behind for
    many batches. The lag gauge used to be set only once the outbox was empty, so it read 0 the
    whole time; now it shows the age of the oldest unpublished row while they wait, and falls
    back once they are out."""
    rows = 3000
    await query(
        db,
        "INSERT INTO outbox (event_id, target, routing_key, payload, created_at) VALUES "
        + ", ".join(["(UUID(), 'events', 'payment.backlog', '{}', NOW(6) - INTERVAL 10 MINUTE)"] * rows),
    )
    async with daemons.in_process(outbox={"batch_size": 1}) as daemon:
        seen: list[tuple[float, int]] = []

        async def lag_shown() -> bool:
            lag = (await scrape(daemon.port)).value("payd_outbox_lag_seconds")
            (left,) = (await query(db, "SELECT COUNT(*) FROM outbox"))[0]
            seen.append((lag, left))
            return lag >= 590

        await eventually(lag_shown, timeout=60, what="the lag gauge to show the backlog's age")
        assert seen[-1][1] > 0, "shown while rows were still waiting"

        async def caught_up() -> bool:
            (left,) = (await query(db, "SELECT COUNT(*) FROM outbox"))[0]
            return left == 0 and (await scrape(daemon.port)).value("payd_outbox_lag_seconds") < 60

        await eventually(caught_up, timeout=120, what="the relay to catch up and the gauge to fall")
        after = await scrape(daemon.port)
    # Each row's own lag, write to broker confirm: all ten minutes old, none under a minute.
    assert after.value("payd_outbox_event_lag_seconds_count") == rows
    assert after.value("payd_outbox_event_lag_seconds_bucket", le="60.0") == 0
    assert after.value("payd_outbox_event_lag_seconds_sum") >= rows * 600


# -- ops/: the dashboard and the alert rules -------------------------------------------

METRIC_NAME = re.compile(r"\bpayd_[a-z0-9_]+\b")


def referenced_metrics(path: Path) -> set[str]:
    """Every payd_* name in the file: queries, legends and runbook text alike."""
    return set(METRIC_NAME.findall(path.read_text()))


def dashboard_queries(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(dashboard_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(dashboard_queries(item))
    return found


@pytest.fixture
def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


async def test_ops_files_name_only_metrics_the_daemon_exports(
    db: aiomysql.Pool, broker: Broker, daemons: DaemonFactory, alert_rules: list[dict[str, Any]]
) -> None:
    """The dashboard and the alert rules cannot drift from the code: every metric they
    name appears in a live scrape (families without samples yet count by their name)."""
    async with daemons.in_process() as daemon:
        exported = (await scrape(daemon.port)).names()
    for path in (DASHBOARD, ALERTS, ALERT_TESTS):
        referenced = referenced_metrics(path)
        assert referenced, f"{path} names no payd metric"
        unknown = sorted(referenced - exported)
        assert not unknown, f"{path.relative_to(ROOT)} names metrics /metrics does not export: {unknown}"
    in_queries = {name for rule in alert_rules for name in METRIC_NAME.findall(rule["expr"])}
    dashboard = json.loads(DASHBOARD.read_text())
    in_panels = {name for query in dashboard_queries(dashboard) for name in METRIC_NAME.findall(query)}
    # The things operators asked for are actually looked at.
    for wanted in (
        "payd_attempts_total",
        "payd_attempt_seconds_bucket",
        "payd_provider_in_flight",
        "payd_provider_limit",
        "payd_provider_waiting",
        "payd_outbox_lag_seconds",
        "payd_reconciled_total",
        "payd_dead_lettered_total",
        "payd_broker_connected",
        "payd_broker_reconnects_total",
        "payd_draining",
        "payd_provider_breaker_state",
        "payd_provider_rate_limited_total",
        "payd_halted",
        "payd_halt_state_stale",
        "payd_halt_state_unknown",
        "payd_database_ok",
        "payd_provider_slots_held",
        "payd_duty_failing",
        "payd_attempts_parked",
        "payd_orphans_failed_total",
    ):
        assert wanted in in_panels, f"no dashboard panel uses {wanted}"
    for wanted in (
        "payd_outbox_lag_seconds",
        "payd_attempts_total",
        "payd_broker_connected",
        "payd_dead_lettered_total",
        "payd_provider_in_flight",
        "payd_provider_breaker_state",
        "payd_halt_state_stale",
        "payd_batch_errors_total",
        "payd_halt_state_unknown",
        "payd_database_ok",
        "payd_orphans_failed_total",
        "payd_duty_failing",
        "payd_attempts_parked",
        "payd_refunds_parked",
        "payd_refunds_pending_stale",
    ):
        assert wanted in in_queries, f"no alert uses {wanted}"


def test_dashboard_is_importable_and_uses_a_datasource_variable() -> None:
    """Grafana imports it as is: a Prometheus datasource variable that every panel uses,
    unique panel ids, every panel placed and queried."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def _github_anchor(heading: str) -> str:
    """How GitHub (and most Markdown renderers) turn a heading into a fragment."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


RUNBOOK_ANCHORS = {
    _github_anchor(line.lstrip("#"))
    for line in (ROOT / "docs" / "runbook.md").read_text().splitlines()
    if line.startswith("#")
}


def test_the_fault_signals_page_or_ticket_as_they_should(alert_rules: list[dict[str, Any]]) -> None:
    """The fault signals added with the fail-safe work have rules, with the severity their cost
    calls for: an instance that calls no provider, a database that does not answer and a lookup
    that found someone else's payment page; orphans failed as never_sent open a ticket."""
    severity = {
        name: rule["labels"]["severity"]
        for rule in alert_rules
        for name in METRIC_NAME.findall(rule["expr"])
        if name != "payd_reconciled_total" or "identity_mismatch" in rule["expr"]
    }
    assert severity["payd_halt_state_unknown"] == "page"
    assert severity["payd_database_ok"] == "page"
    assert severity["payd_reconciled_total"] == "page"
    assert severity["payd_orphans_failed_total"] == "ticket"


def test_every_alert_says_what_it_means_and_what_to_do(alert_rules: list[dict[str, Any]]) -> None:
    """Each rule has a severity, a summary, a runbook an on-call engineer can act on and a link to
    its section of docs/runbook.md."""
    assert len(alert_rules) >= 6
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names))
    for rule in alert_rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert len(annotations["runbook"].split()) >= 20, f"{rule['alert']}: runbook too thin"
        assert METRIC_NAME.search(rule["expr"]), rule["alert"]
        # The on-call engineer lands on the runbook's section for it.
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/runbook.md" and anchor in RUNBOOK_ANCHORS, rule["alert"]
        # Balanced brackets: the cheapest PromQL syntax check without promtool.
        for opening, closing in ("()", "[]", "{}"):
            assert rule["expr"].count(opening) == rule["expr"].count(closing), rule["alert"]


@pytest.mark.skipif(
    not (os.environ.get("PROMTOOL") or shutil.which("promtool")),
    reason="promtool not installed (set PROMTOOL or put it on PATH)",
)
def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    """The rules parse, and each alert fires on the series it is meant for (and a healthy
    instance fires none): ops/prometheus/payd-alerts.test.yml run by promtool."""
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool") or "promtool"
    for command in (["check", "rules", ALERTS.name], ["test", "rules", ALERT_TESTS.name]):
        done = subprocess.run(
            [promtool, *command], check=False, cwd=ALERTS.parent, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
