"""The interpreter's cyclic garbage collector, set for a long-running daemon.

With Python's defaults a busy daemon spent about 9% of its CPU in the cyclic
collector (``load/bench.py`` at saturation, collections timed with
``gc.callbacks``), over half of it in full collections that walked every object
made at start-up (modules, classes, configuration, about 80,000 objects) to find
nothing: those objects live as long as the process. Just before intake starts,
:func:`tune_garbage_collector` collects once, moves everything then alive out
of the collector's sight (``gc.freeze``) and lets the youngest generation grow
to ``YOUNG_THRESHOLD`` objects before it is scanned. Objects of an attempt die
by reference counting as before; only reference cycles wait a little longer for
their collection.

What the freeze can keep: a frozen object that is dropped later is still freed
by reference counting, but one that dies inside a reference cycle is never
collected (frozen objects sit in a permanent generation that no collection
looks at), and neither is anything young it alone still refers to (say an
exception and its traceback). That is bounded (each frozen object dies once,
and start-up made all of them) but can be larger than start-up's heap.
Measured: 253 MiB at 10,000 attempts in flight, against 247 MiB before
(``docs/benchmarks.md``).

The numbers are CPython 3.11's: three generations, ``set_threshold(young,
middle, oldest)``. A later collector (3.14's incremental one has two generations) reads
them differently, so re-measure them with the interpreter.
"""

from __future__ import annotations

import gc
from typing import Final

YOUNG_THRESHOLD: Final = 10_000
"""Net new container objects between scans of the young generation (Python's default: 700).

In 10,000-attempt runs at saturation, 5,000 and 10,000 left the collector about 1% of the
daemon's CPU (against 8.7% with the defaults); 10,000 ran 25 young and 1 middle collections
(about 5 ms per young scan) where 5,000 ran 64 and 5 (about 1.6 ms): fewer of the middle
ones, which walk more, for pauses well under the control endpoint's and the provider calls'
time budgets.
"""


def tune_garbage_collector() -> None:
    """Freeze what start-up built and widen the young generation; call once, before intake.

    For the daemon's own process (``payd run``): a process that starts many daemons in turn
    (the test suite) must undo it (``gc.unfreeze``, the old thresholds) or its frozen heap
    only grows.
    """
    gc.collect()  # so that start-up's garbage is freed, not frozen
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
