"""What /proc says about processes and the machine: CPU time, peak RSS, busy cores.

Everything here is a plain read of a /proc file, cheap enough to run once a
second during a benchmark without disturbing it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), or None if it is gone.

    /proc/PID/stat field 2 (comm) may contain spaces and parentheses, so the
    numeric fields are counted from the last ')'. utime and stime are fields
    14 and 15, which are the 12th and 13th after the closing parenthesis.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND


def status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/PID/status (``VmHWM`` is the peak resident set), or None."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def open_fds(pid: int) -> int:
    """How many file descriptors the process holds (0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def pids_named(comm: str) -> list[int]:
    """Processes whose command name (/proc/PID/comm) is exactly ``comm``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == comm:
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over cores."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is already in user.
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return (total - idle) / _TICKS_PER_SECOND, total / _TICKS_PER_SECOND


class CpuMeter:
    """CPU seconds of named groups of processes, read together so deltas line up.

    A group is a list of pids (MariaDB is one process, RabbitMQ's beam.smp is
    one, payd's daemon is one); a process that exits counts as 0 from then on.
    """

    def __init__(self, groups: dict[str, Iterable[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}

    def read(self) -> dict[str, float]:
        readings = {name: sum(cpu_seconds(pid) or 0.0 for pid in pids) for name, pids in self.groups.items()}
        busy, total = machine_cpu()
        readings["machine_busy"] = busy
        readings["machine_total"] = total
        return readings


def cpu_deltas(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    return {name: end[name] - start[name] for name in start}
