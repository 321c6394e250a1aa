"""Memory probes: the process's peak resident set size since a reset, and its resident set size now.

Linux only (``/proc/self/clear_refs``, ``/proc/self/status``); elsewhere the probes return ``None``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

__all__ = ["peak_rss", "resident_mib"]


def peak_rss() -> Callable[[], float | None]:
    """Reset the process's peak resident set size; returns a function reading the peak since, in MiB.

    Linux only (``/proc/self/clear_refs`` + ``VmHWM``); elsewhere the reader returns ``None``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return lambda: None

    def read() -> float | None:
        return _proc_status_mib("VmHWM")

    return read


def resident_mib() -> float | None:
    """The process's resident set size now, in MiB (Linux; ``None`` elsewhere)."""
    return _proc_status_mib("VmRSS")


def _proc_status_mib(field_name: str) -> float | None:
    """One ``kB`` field of ``/proc/self/status`` in MiB, or ``None`` where it cannot be read."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1]) / 1024.0
    return None
