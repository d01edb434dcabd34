"""Resident-memory probes (Linux /proc), shared by the harness and the per-family benchmark scripts.

Peaks come from VmHWM, never `ru_maxrss`: Linux carries `ru_maxrss` across fork + exec, so a process
started from a large parent (a pytest session, a sweep) would report the parent's resident set as its
own peak. Writing 5 to /proc/self/clear_refs resets VmHWM to the current resident set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def current_rss_bytes() -> int:
    """Resident set size now (VmRSS), in bytes."""
    return status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own memory so far (VmHWM), in bytes."""
    return status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set, so earlier peaks (imports, set-up) do not count."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_growth_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """Bytes by which the resident set peaks above its value just before `fn(*args)` runs."""
    reset_peak_rss()
    before = current_rss_bytes()
    fn(*args)
    return max(0, peak_rss_bytes() - before)
