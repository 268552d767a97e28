"""The interpreter's cyclic garbage collector, set for a long-running daemon.

With Python's defaults a busy daemon spent about 9% of its CPU in the cyclic
collector (``load/bench.py`` at saturation, measured with ``gc.callbacks``), over
half of it in full collections that walked every object made at start-up
(modules, classes, configuration) to find nothing: those objects live as long as
the process. Once the daemon is ready, :func:`tune_garbage_collector` collects
once, moves everything then alive out of the collector's sight (``gc.freeze``)
and lets the youngest generation grow to ``YOUNG_THRESHOLD`` objects before it
is scanned. Objects of an attempt die by reference counting as before; only
reference cycles wait a little longer for their collection.

A frozen object that is dropped later (the first broker connection after a
reconnect, a pooled MySQL connection recycled) is still freed by reference
counting; only one caught in a reference cycle stays. So the most the freeze
can keep is what was alive when the daemon became ready, once: it cannot grow.

Measured on 10,000-attempt runs at saturation (see ``docs/benchmarks.md``): the
collector's share of the daemon's CPU went from 8.7% to about 1% (25 scans of the
young generation of about 5 ms each, instead of 1,034 young, 94 middle and 9 full
collections, the full ones 52 ms each).
"""

from __future__ import annotations

import gc
from typing import Final

YOUNG_THRESHOLD: Final = 10_000
"""Net new container objects between scans of the youngest generation (Python's default: 700)."""


def tune_garbage_collector() -> None:
    """Freeze what start-up built and widen the young generation; call once the daemon is ready.

    Only for the daemon's own process (``payd run``): frozen objects are never
    collected, so a process that starts many daemons in turn (the test suite)
    must not call it.
    """
    gc.collect()  # so that start-up's garbage is freed, not frozen
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
