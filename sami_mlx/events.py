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
    base_ppl: float | None  # perplexity of the --heldout text under the base model (None without one)
    resumed_at_step: int = 0  # 0 for a fresh run
    memory_estimate_gb: float | None = None  # estimated peak, checked against the machine before starting
    monitor_queries: int = 0  # held-out queries the degeneration monitor watches (0: monitor off)
    base_heldout_mi: float | None = None  # MI bound of the base model's answers to them
    model_note: str = ""  # how the weights were loaded when not as stored (--dequantize), and why


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
class GroupSampled(Event):
    """One query's responses, one per variant, as soon as the last of them ends (or, with `resumed`,
    read back from RUN/iter-NN/samples.partial.jsonl by a resumed run). Not logged to metrics.jsonl:
    the responses are in the samples files, and SamplesReady has the counts."""

    iteration: int
    query: str
    variants: list  # labels such as "+-"
    responses: list  # texts, one per variant
    finish: list  # "eos", "stop" or "length", one per variant
    done: int  # groups sampled so far in this iteration, this one included (dropped ones too)
    total: int  # usable groups the iteration needs (more are sampled to replace dropped ones)
    resumed: bool = False


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
    queries_sampled: int = 0  # query groups sampled, dropped ones included (more are drawn to replace drops)
    repeated: int = 0  # step slots filled by repeating a group: the split ran out of queries
    repetition: float = 0.0  # share of trigrams repeating an earlier one in the same response
    dropped_truncated: int = 0  # --drop-truncated: a response hit --max-tokens
    dropped_unfinished: int = 0  # --sentence-end: a checked response does not end a sentence
    dropped_echoed: int = 0  # --echo-words: a response copies a principle's wording


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
    variants: list = field(default_factory=list)  # that group's variant labels ("+-"): the rows and columns of scores
    query: str = ""  # that group's query text (runs before this field: absent)


@dataclass
class MonitorChecked(Event):
    """The degeneration monitor's reading: drift is the perplexity of the base model's own held-out
    answers under the current model, as a multiple of the base's (with and without the constitution).
    Inside an iteration only the drift is measured; at its end also the model's own answers."""

    iteration: int
    step: int  # optimizer steps done in the iteration when checked
    drift_prompted: float | None
    drift_plain: float | None
    healthy: bool
    limit: float | None  # --max-ppl-ratio (None: the guard is off)
    heldout_mi: float | None = None  # MI bound on the held-out queries
    mean_length: float | None = None  # of the model's held-out answers, in tokens
    limit_rate: float | None = None  # share of them that hit --max-tokens
    distinct_2: float | None = None
    repetition: float | None = None  # share of trigrams repeating an earlier one in the same answer
    ppl_ratio: float | None = None  # --heldout text, if given


@dataclass
class IterationCompleted(Event):
    iteration: int
    loss: float
    mi_bound: float
    row_accuracy: float
    column_accuracy: float
    adapter_dir: str
    healthy: bool = True
    drift_prompted: float | None = None
    drift_plain: float | None = None
    heldout_mi: float | None = None
    mean_length: float | None = None
    limit_rate: float | None = None
    distinct_2: float | None = None
    repetition: float | None = None
    heldout_ppl: float | None = None  # --heldout text, if given
    ppl_ratio: float | None = None


@dataclass
class RunWarning(Event):
    message: str


@dataclass
class RunCompleted(Event):
    run_dir: str
    seconds: float
    stopped_early: bool = False
    reason: str = ""
    adapters: str = ""  # which adapters RUN/adapters.safetensors holds: "iter-02", "iter-03 step 8", "base"
    kept: str = ""  # why: "best held-out MI bound +0.41", "last healthy"


@dataclass
class StageProgress(Event):
    """Progress of work around a run (building the toy model, evaluating) for progress bars."""

    stage: str
    done: int
    total: int
    detail: str = ""
