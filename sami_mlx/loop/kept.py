"""Which adapters a run keeps in RUN/adapters.safetensors, and why, in words.

Pure functions over the iterations' summaries (as RUN/state.json holds them), free of MLX, so that
export and eval can describe a run without loading the loop."""

from __future__ import annotations

import math
from collections.abc import Sequence


def choose_kept(iterations: Sequence[dict], rule: str) -> dict | None:
    """The summary `rule` keeps among the healthy ones: "last", or "best" (the highest held-out MI
    bound, the later on a tie; the last when none was measured). None when none was healthy."""
    healthy = [s for s in iterations if s.get("healthy", True)]
    if not healthy:
        return None
    if rule == "last" or all(s.get("heldout_mi") is None for s in healthy):
        return healthy[-1]
    return max(
        healthy,
        key=lambda s: (-math.inf if s.get("heldout_mi") is None else s["heldout_mi"], s["iteration"], s["step"]),
    )


def kept_record(chosen: dict | None, rule: str) -> dict:
    """What RUN/state.json's `kept` says of the chosen summary (None: the base model)."""
    if chosen is None:
        return {"name": "base", "rule": rule}
    return {
        "name": checkpoint_name(chosen),
        "rule": rule,
        **{k: chosen.get(k) for k in ("iteration", "step", "adapters", "heldout_mi")},
    }


def checkpoint_name(summary: dict) -> str:
    """ "iter-NN", or "iter-NN step S" for a healthy step measured inside an iteration."""
    name = f"iter-{summary['iteration']:02d}"
    return f"{name} step {summary['step']}" if summary.get("partial") else name


def describe_kept(kept: dict | None, before: str = "", after: str = "") -> str:
    """Why RUN/adapters.safetensors holds what it holds, in words ('' before any iteration ended)."""
    if not kept:
        return ""
    if kept["name"] == "base":
        text = "no iteration was healthy: the base model"
    elif kept["rule"] == "best" and kept.get("heldout_mi") is not None:
        text = f"best held-out MI bound, {kept['heldout_mi']:+.3f} nats"
    else:
        text = "the last healthy iteration"
    return before + text + after
