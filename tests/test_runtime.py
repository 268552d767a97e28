"""The daemon's garbage-collector set-up (daemon/runtime.py)."""

from __future__ import annotations

import gc
import weakref

from daemon.runtime import YOUNG_THRESHOLD, tune_garbage_collector


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_start_up_is_frozen_and_the_young_generation_widened() -> None:
    before = gc.get_threshold()
    try:
        alive = [_Cycle() for _ in range(10)]
        tune_garbage_collector()
        assert gc.get_freeze_count() >= len(alive)
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_garbage_of_start_up_is_collected_not_frozen() -> None:
    before = gc.get_threshold()
    try:
        gc.disable()  # so that only the tuning's own collection can free the cycles
        garbage = [weakref.ref(_Cycle()) for _ in range(1000)]
        assert all(ref() is not None for ref in garbage)  # cycles: only the collector frees them
        tune_garbage_collector()
        assert all(ref() is None for ref in garbage)
    finally:
        gc.enable()
        gc.unfreeze()
        gc.set_threshold(*before)
