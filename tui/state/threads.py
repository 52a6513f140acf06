"""MLX work off the UI thread, in a thread of its own that frees its MLX streams when it ends."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` in a new thread and wait for it; return its result or raise its exception.

    Textual's thread workers run on a reused pool, but MLX keeps streams per thread and aborts the
    process at exit ("terminate called without an active exception", ml-explore/mlx#3126) unless
    each thread that used them calls `mx.clear_streams()` before it ends; a cleared thread cannot
    use mlx-lm's generation stream again. So each piece of MLX work gets a thread of its own.
    """
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread as is
            outcome["error"] = e
        finally:
            import mlx.core as mx

            mx.clear_streams()

    thread = threading.Thread(target=target, name=f"sami-mlx:{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
