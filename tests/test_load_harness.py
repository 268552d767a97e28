"""The benchmark harness's own arithmetic (load/): what it reports must be what happened.

Not benchmarks: the outbox-lag figures of ``load/bench.py`` and the SQL seeding of
``load/renewals_bench.py``, on made-up timestamps and on the test database.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import aiomysql
import pytest

from tests.support import query

LOAD = Path(__file__).resolve().parent.parent / "load"
sys.path.insert(0, str(LOAD))

import renewals_bench  # noqa: E402
from benchkit.report import daemon_outbox_lag  # noqa: E402
from benchkit.traffic import Tracker  # noqa: E402


def test_outbox_lag_is_event_consumed_minus_outcome_committed() -> None:
    """Per attempt with both a commit time (MySQL, wall clock) and a terminal event (monotonic,
    here): event wall time - commit time; attempts missing either are left out."""
    tracker = Tracker("r1", 3)
    for index in range(3):
        tracker.mark_published(index, 100.0 + index)
    tracker.mark_event("payment.succeeded", "bench-r1-0", 110.0)
    tracker.mark_event("payment.declined", "bench-r1-1", 112.5)
    wall = tracker.wall_offset
    commits = {
        "bench-r1-0": wall + 109.75,  # event 250 ms after the commit
        "bench-r1-1": wall + 110.5,  # 2 s after
        "bench-r1-2": wall + 111.0,  # committed, event not seen yet: no lag to report
        "bench-other-9": wall + 50.0,  # another run's row: ignored
    }
    assert sorted(round(lag, 6) for lag in tracker.outbox_lags_s(commits)) == [0.25, 2.0]


def test_daemon_outbox_lag_reads_the_histogram_share_within_one_second() -> None:
    scrape = "\n".join(
        [
            "# HELP payd_outbox_event_lag_seconds Per published outbox row",
            "# TYPE payd_outbox_event_lag_seconds histogram",
            'payd_outbox_event_lag_seconds_bucket{le="0.5"} 90.0',
            'payd_outbox_event_lag_seconds_bucket{le="1.0"} 99.0',
            'payd_outbox_event_lag_seconds_bucket{le="+Inf"} 100.0',
            "payd_outbox_event_lag_seconds_count 100.0",
            "payd_outbox_event_lag_seconds_sum 40.0",
        ]
    )
    lag = daemon_outbox_lag(scrape + "\n")
    assert lag is not None
    assert (lag.events, lag.mean_ms, lag.share_within_1s) == (100, 400.0, 0.99)
    assert daemon_outbox_lag("# nothing here\n") is None


async def test_sql_seeding_matches_the_shares_it_promises(db: aiomysql.Pool) -> None:
    """INSERT ... SELECT over seq_1_to_N: every id once, 2% canceled (never due), about the
    due fraction due, about the history fraction with a past attempt; the same every time."""
    rows, due_fraction, history_fraction = 4000, 0.25, 0.2
    args = argparse.Namespace(due_fraction=due_fraction, history_fraction=history_fraction)
    await renewals_bench.seed_sql(db, 1, rows, args)
    ((count, lowest, highest, canceled, canceled_due, due),) = await query(
        db,
        "SELECT COUNT(*), MIN(id), MAX(id), SUM(status = 'canceled'), "
        "SUM(status = 'canceled' AND next_attempt_at IS NOT NULL), SUM(next_attempt_at <= NOW(6)) "
        "FROM subscriptions",
    )
    assert (count, lowest, highest) == (rows, 1, rows)
    assert canceled_due == 0
    assert math.isclose(canceled / rows, 0.02, abs_tol=0.01)
    assert math.isclose(due / (rows - canceled), due_fraction, abs_tol=0.03)
    ((history, keyed_right),) = await query(
        db,
        "SELECT COUNT(*), SUM(a.idempotency_key = CONCAT('hist:', s.id) AND a.created_at < NOW(6)) "
        "FROM attempts a JOIN subscriptions s ON s.id = a.subscription_id",
    )
    assert history == keyed_right
    assert math.isclose(history / rows, history_fraction, abs_tol=0.03)
    first = await query(db, "SELECT id, status, amount_minor, card_brand FROM subscriptions ORDER BY id")
    await query(db, "DELETE FROM attempts")
    await query(db, "DELETE FROM subscriptions")
    await renewals_bench.seed_sql(db, 1, rows, args)
    again = await query(db, "SELECT id, status, amount_minor, card_brand FROM subscriptions ORDER BY id")
    assert again == first, "seeded from hashes of the id: the same rows every time"


def test_sizes_must_ascend() -> None:
    parse = renewals_bench.build_parser().parse_args
    assert renewals_bench.sizes(parse(["--sizes", "100_000,1000000,3000000"])) == [
        100_000,
        1_000_000,
        3_000_000,
    ]
    assert renewals_bench.sizes(parse([])) == [100_000, 1_000_000]
    with pytest.raises(SystemExit, match="ascending"):
        renewals_bench.sizes(parse(["--sizes", "1000000,100000"]))
