"""`--report-to wandb,swanlab`: a run's events, logged to Weights & Biases and/or SwanLab.

One more event consumer beside the progress bar. mlx-lm's reporting callbacks (mlx_lm.tuner.callbacks) start
the trackers, as `mlx_lm.lora --report-to` does (project, run name = the run directory's name, files under it,
the run's config), and log the numbers; the samples table and the end of the run go to each tracker's own API.
The x-axis is the optimizer step (mlx-lm's "iteration"). The loop calls callbacks on rank 0 only, and the
trackers start at RunStarted, so other ranks never start one. Offline: WANDB_MODE=offline, SWANLAB_MODE=offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sami_mlx import events as ev
from sami_mlx.config import TrainConfig, parse_report_to
from sami_mlx.config_file import config_from_file
from sami_mlx.errors import SamiError

PROJECT = "sami-mlx"
SAMPLE_COLUMNS = ["iteration", "query", "variant", "response"]


def _callbacks() -> Any:
    from mlx_lm.tuner import callbacks  # imports wandb and swanlab where installed: only when tracking

    return callbacks


def check_installed(report_to: str) -> None:
    """Raise SamiError naming the pip extra when a tracker in `report_to` ('wandb,swanlab') is not installed."""
    if not report_to:
        return
    callbacks = _callbacks()
    for name in report_to.split(","):
        if getattr(callbacks, name, None) is None:
            raise SamiError(f"--report-to {name}: {name} is not installed; pip install 'sami-mlx[{name}]'")


def resumed_report_to(run_dir: str, given: str | None) -> str:
    """--report-to for `--resume RUN`: the flag when given (where a run reports is no part of what it trains),
    else the run's config.yaml."""
    path = Path(run_dir).expanduser() / "config.yaml"
    if given is None and path.is_file():  # no config.yaml: resume() says what is wrong
        given = config_from_file(str(path)).get("report_to")
    return parse_report_to(given or "")


def _numbers(prefix: str, event: ev.Event, names: tuple[str, ...]) -> dict[str, float]:
    """The event's fields `names` that are set, as prefix/name (booleans as 0/1)."""
    out = {}
    for name in names:
        value = getattr(event, name)
        if value is not None:
            out[f"{prefix}/{name}"] = float(value)
    return out


class Tracker:
    """Consumes a run's events and reports them to the trackers named in `report_to` ('wandb,swanlab')."""

    def __init__(self, report_to: str, project: str = PROJECT):
        check_installed(report_to)
        self.report_to = report_to
        self.project = project
        self.callback: Any = None  # mlx-lm's chain of reporting callbacks, from RunStarted on
        self.step = 0  # the last optimizer step logged: every tracker wants steps that never go back
        self.offsets: list[int] = []  # optimizer steps before each iteration
        self.rows: list[list] = []  # the samples table so far
        self.ended = False  # RunCompleted came

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            self.start(event)
        elif self.callback is None:
            return
        elif isinstance(event, ev.SamplesReady):
            self.samples(event)
        elif isinstance(event, ev.StepCompleted):
            self.step = max(self.step, event.global_step)
            names: tuple[str, ...] = ("loss", "mi_bound", "row_accuracy", "column_accuracy", "kl", "anchor_kl")
            names += ("learning_rate", "grad_norm", "tokens_per_sec", "peak_memory_gb")
            self.callback.on_train_loss_report(
                {"iteration": self.step, "train/sami_iteration": event.iteration, **_numbers("train", event, names)}
            )
        elif isinstance(event, ev.MonitorChecked):  # sent before the event of the step it checked
            names = ("drift_prompted", "drift_plain", "healthy", "heldout_mi", "mean_length", "limit_rate")
            names += ("distinct_2", "repetition", "ppl_ratio")
            self.log("monitor", event, names, self.offsets[event.iteration - 1] + event.step)
        elif isinstance(event, ev.IterationCompleted):
            names = ("loss", "mi_bound", "row_accuracy", "column_accuracy", "healthy", "heldout_ppl")
            self.log("iteration", event, names, self.offsets[event.iteration])
        elif isinstance(event, ev.RunCompleted):
            self.completed(event)

    def start(self, event: ev.RunStarted) -> None:
        """Start the trackers: mlx-lm's callbacks, one run named after the run directory, files inside it."""
        cfg = TrainConfig(**event.config)
        self.offsets = [sum(cfg.steps_in_iteration(i) for i in range(it)) for it in range(cfg.iterations + 1)]
        self.step = event.resumed_at_step
        run_dir = str(Path(event.run_dir).resolve())
        self.callback = _callbacks().get_reporting_callbacks(self.report_to, self.project, run_dir, event.config)
        start = {"iteration": self.step, "run/trainable_parameters": float(event.trainable_parameters)}
        if event.base_heldout_mi is not None:  # the base model's reading: where the monitor's curve starts
            start["monitor/base_heldout_mi"] = event.base_heldout_mi
        if event.base_ppl is not None:
            start["monitor/base_heldout_ppl"] = event.base_ppl
        self.callback.on_val_loss_report(start)

    def log(self, prefix: str, event: ev.Event, names: tuple[str, ...], step: int) -> None:
        """Held-out readings, through mlx-lm's validation report, at `step` (or later: steps never go back)."""
        self.step = max(self.step, step)
        self.callback.on_val_loss_report({"iteration": self.step, **_numbers(prefix, event, names)})

    def samples(self, event: ev.SamplesReady) -> None:
        """The sampling numbers, and the iteration's example responses as rows of the samples table."""
        names: tuple[str, ...] = ("groups", "dropped_empty", "dropped_identical", "dropped_banned")
        names += ("dropped_echoed", "dropped_truncated")
        names += ("dropped_unfinished", "mean_length", "no_eos_rate", "distinct_2", "repetition", "tokens_per_sec")
        self.callback.on_train_loss_report({"iteration": self.step, **_numbers("sampling", event, names)})
        new = [
            [event.iteration, example["query"], variant, response]
            for example in event.examples
            for variant, response in zip(example["variants"], example["responses"])
        ]
        self.rows += new
        callbacks = _callbacks()
        for backend in self.backends():
            if isinstance(backend, callbacks.WandBCallback):  # a logged table is final: log the whole one again
                callbacks.wandb.log(
                    {"samples": callbacks.wandb.Table(columns=SAMPLE_COLUMNS, data=self.rows)}, step=self.step
                )
            elif isinstance(backend, callbacks.SwanLabCallback):
                texts = [callbacks.swanlab.Text(row[3], caption=f"iter {row[0]} {row[2]}: {row[1]}") for row in new]
                callbacks.swanlab.log({"samples": texts}, step=self.step)

    def completed(self, event: ev.RunCompleted) -> None:
        """The run's time and end: numbers through mlx-lm's report; which adapters it kept and why, in words."""
        self.ended = True
        self.callback.on_val_loss_report(
            {"iteration": self.step, "run/seconds": event.seconds, "run/stopped_early": float(event.stopped_early)}
        )
        words = {"adapters": event.adapters, "kept": event.kept, "reason": event.reason}
        callbacks = _callbacks()
        for backend in self.backends():
            if isinstance(backend, callbacks.WandBCallback) and callbacks.wandb.run is not None:
                callbacks.wandb.run.summary.update(words)
            elif isinstance(backend, callbacks.SwanLabCallback):
                text = "; ".join(f"{k}: {v}" for k, v in words.items() if v)
                callbacks.swanlab.log({"run/result": callbacks.swanlab.Text(text)}, step=self.step)

    def close(self) -> None:
        """End the trackers' runs (after the progress bar, so that their last lines print below it): finished,
        or failed when the run ended without RunCompleted (an error, Ctrl-C)."""
        if self.callback is None:
            return
        callbacks = _callbacks()
        for backend in self.backends():
            if isinstance(backend, callbacks.WandBCallback):
                callbacks.wandb.finish(exit_code=0 if self.ended else 1)
            elif isinstance(backend, callbacks.SwanLabCallback):
                callbacks.swanlab.finish(state="success" if self.ended else "crashed")
        self.callback = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def backends(self) -> list:
        """mlx-lm's callbacks in the chain, each wrapping the one before."""
        out, cb = [], self.callback
        while cb is not None:
            out.append(cb)
            cb = cb.wrapped_callback
        return out
