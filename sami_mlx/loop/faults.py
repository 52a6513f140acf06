"""Fault injection for the crash tests: SAMI_MLX_KILL_AT="point:n" SIGKILLs the process the n-th
time it reaches `point`; "point:n:INT" sends it SIGINT there instead (a Ctrl-C at a known moment).
Unset (always, outside tests), a fault point costs one dict lookup."""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
_target = os.environ.get("SAMI_MLX_KILL_AT", "")


def fault_point(name: str) -> None:
    """Die here, without cleanup (or take the signal named), if the environment asks for it."""
    if not _target:
        return
    point, _, rest = _target.partition(":")
    if point != name:
        return
    n, _, sig = rest.partition(":")
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(n or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)
