"""Summarise py-spy's collapsed stacks (``--format raw``) into hot spots.

Three views, each as shares of all samples:
- self: the function on top of the stack (where the CPU actually was);
- inclusive: every function on the stack (what the time was spent under);
- payd: the deepest frame inside ``daemon/`` (which line of payd's own code led there),
  the view to optimise from, since library internals are only reachable through it;
- library: the library nearest the top of the stack (what kind of work it was).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


# Path fragments of py-spy frames -> the kind of work; checked from the top of the stack down.
_LIBRARIES = (
    ("aiohttp/", "HTTP (aiohttp)"),
    ("aiomysql/", "MySQL (aiomysql, PyMySQL)"),
    ("pymysql/", "MySQL (aiomysql, PyMySQL)"),
    ("aiormq/", "AMQP (aio-pika, aiormq, pamqp)"),
    ("aio_pika/", "AMQP (aio-pika, aiormq, pamqp)"),
    ("pamqp/", "AMQP (aio-pika, aiormq, pamqp)"),
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("structlog/", "logging (structlog)"),
    ("msgspec/", "msgspec"),
    ("daemon/", "payd's own code"),
)


def _library(frames: list[str]) -> str:
    for frame in reversed(frames):
        if "daemon/cli.py" in frame:
            break  # only the entry point below: the event loop's own time
        for fragment, name in _LIBRARIES:
            if f"({fragment}" in frame or f"/{fragment}" in frame:
                return name
    return "event loop and stdlib (asyncio, uvloop)"


def _strip_line(frame: str) -> str:
    """``f (a/b.py:12)`` -> ``f (a/b.py)``: aggregate a function over its lines."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['function']} ({match['file']})"


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarise(path: Path, top: int = 15) -> str:
    stacks = read_stacks(path)
    total = sum(count for _, count in stacks)
    if not total:
        return f"{path}: no samples"
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    payd: Counter[str] = Counter()
    library: Counter[str] = Counter()
    for frames, count in stacks:
        library[_library(frames)] += count
        self_time[_strip_line(frames[-1])] += count
        for function in {_strip_line(frame) for frame in frames}:
            inclusive[function] += count
        ours = [frame for frame in frames if "daemon/" in frame and "daemon/cli.py" not in frame]
        payd[ours[-1] if ours else "(no payd frame: event loop, library callbacks)"] += count

    def table(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"{title}:"]
        rows += [f"  {count / total * 100:5.1f}%  {name}" for name, count in counter.most_common(top)]
        return rows

    lines = [f"py-spy profile {path}: {total} samples"]
    lines += table("self time by function", self_time)
    lines += table("inclusive time by function", inclusive)
    lines += table("deepest payd frame (file:line)", payd)
    lines += table("by library nearest the top of the stack", library)
    return "\n".join(lines)
