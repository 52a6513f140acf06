"""Typed progress events: the loop's only output. The CLI bar, metrics.jsonl and the TUI consume them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Event:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with the event's name under 'event'."""
        return {"event": type(self).__name__, **dataclasses.asdict(self)}


@dataclass
class RunStarted(Event):
    run_dir: str
    config: dict
    iterations: int
    total_steps: int
    num_variants: int
    trainable_parameters: int
    base_ppl: float
    resumed_at_step: int = 0  # 0 for a fresh run
    memory_estimate_gb: float | None = None  # estimated peak, checked against the machine before starting


@dataclass
class IterationStarted(Event):
    iteration: int
    steps: int
    queries: int


@dataclass
class SamplingProgress(Event):
    iteration: int
    done: int
    total: int


@dataclass
class SamplesReady(Event):
    """The iteration's rollouts, after degenerate groups were dropped."""

    iteration: int
    groups: int
    dropped_empty: int
    dropped_identical: int
    dropped_banned: int
    mean_length: float
    no_eos_rate: float
    distinct_2: float
    tokens_per_sec: float
    examples: list = field(default_factory=list)  # a few groups: query, variant labels, responses
    dropped_truncated: int = 0  # --drop-truncated: a response hit --max-tokens
    dropped_unfinished: int = 0  # --sentence-end: a checked response does not end a sentence


@dataclass
class StepCompleted(Event):
    iteration: int
    step: int  # within the iteration, 1-based
    steps: int  # in this iteration
    global_step: int
    loss: float
    mi_bound: float
    row_accuracy: float
    column_accuracy: float
    kl: float
    learning_rate: float
    grad_norm: float
    tokens_per_sec: float
    peak_memory_gb: float
    scores: list  # the first group's N x N score matrix
    anchor_kl: float = 0.0  # KL to the base after prompts with no constitution (--anchor-beta)


@dataclass
class IterationCompleted(Event):
    iteration: int
    loss: float
    mi_bound: float
    row_accuracy: float
    column_accuracy: float
    heldout_ppl: float
    ppl_ratio: float
    adapter_dir: str


@dataclass
class RunWarning(Event):
    message: str


@dataclass
class RunCompleted(Event):
    run_dir: str
    seconds: float
    stopped_early: bool = False
    reason: str = ""


ALL_EVENTS = {
    cls.__name__: cls
    for cls in (RunStarted, IterationStarted, SamplingProgress, SamplesReady, StepCompleted,
                IterationCompleted, RunWarning, RunCompleted)
}


@dataclass
class StageProgress(Event):
    """Progress of work around a run (building the toy model, evaluating) for progress bars."""

    stage: str
    done: int
    total: int
    detail: str = ""


ALL_EVENTS[StageProgress.__name__] = StageProgress
