"""The daemon's garbage-collector set-up (daemon/runtime.py), and that ``payd run`` applies it."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from daemon.runtime import YOUNG_THRESHOLD, tune_garbage_collector
from tests.support import DaemonFactory


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """Undo the tuning after the test: this process starts many daemons."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_what_is_alive_is_frozen_and_the_young_generation_widened() -> None:
    alive = _Cycle()
    gc.collect()  # an old object, as start-up's are by the time the daemon is ready
    assert any(obj is alive for obj in gc.get_objects())
    tune_garbage_collector()
    assert not any(obj is alive for obj in gc.get_objects()), "frozen: out of every generation"
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD


@pytest.mark.usefixtures("restored_collector")
def test_old_garbage_is_collected_before_the_freeze_not_frozen() -> None:
    """Garbage that start-up made and that already survived a collection (so sits in the
    oldest generation) must be freed by the tuning's own full collection, not frozen."""
    kept = [_Cycle() for _ in range(1000)]
    garbage = [weakref.ref(cycle) for cycle in kept]
    gc.collect()  # promoted to the oldest generation while still referenced
    gc.disable()  # only the tuning's own collection may free them now
    del kept
    assert all(ref() is not None for ref in garbage), "cycles: only the collector frees them"
    tune_garbage_collector()
    assert all(ref() is None for ref in garbage)


async def test_payd_run_tunes_the_collector_before_intake(daemons: DaemonFactory) -> None:
    """The real process: ``/status`` shows start-up frozen and the young threshold set."""
    daemon = await daemons.process()
    status = await daemon.status()
    assert status["gc"]["frozen_objects"] > 10_000
    assert status["gc"]["thresholds"][0] == YOUNG_THRESHOLD
