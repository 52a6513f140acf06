"""What SamiLoop holds and its mixins read: one declaration for Sampling, Stepping and HealthChecks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.nn as nn

from sami_mlx import events as ev
from sami_mlx.config import TrainConfig
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.prepare import RunInputs


class LoopParts:
    """The run's settings, inputs, model and outlets; SamiLoop sets them, the mixins only read them."""

    cfg: TrainConfig
    inputs: RunInputs
    model: nn.Module
    tokenizer: Any  # mlx-lm's TokenizerWrapper
    out: Path
    ranks: Ranks
    strategy: str | int
    emit: Callable[[ev.Event], None]
    should_stop: Callable[[], bool]
