"""The error guard every command runs under: a user's mistake is one line and exit code 2."""

from __future__ import annotations

import sys

from sami_mlx.errors import RunAborted, SamiError


def guarded(fn, *args) -> int:
    """Turn a user's mistake into one line on stderr and exit code 2, with no traceback."""
    try:
        return fn(*args)
    except (SamiError, RunAborted) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN", file=sys.stderr)
        return 130
