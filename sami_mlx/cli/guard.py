"""The error guard every command runs under: a user's mistake is one line and exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from sami_mlx.errors import RunAborted, SamiError


def guarded(fn, *args) -> int:
    """Turn a user's mistake into one line on stderr and exit code 2, with no traceback."""
    try:
        return fn(*args)
    except (SamiError, RunAborted) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # commands that can say more wrap their run in on_interrupt
        print("\ninterrupted", file=sys.stderr)
        return 130


def on_interrupt(message: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Ctrl-C prints `interrupted; <message>` (what to do next, or what was not written) on a line of its
    own (after any progress bar) and exits with code 130."""

    def wrap(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def run(*args) -> int:
            try:
                return fn(*args)
            except KeyboardInterrupt:
                print(f"\ninterrupted; {message}", file=sys.stderr)
                return 130

        return run

    return wrap
