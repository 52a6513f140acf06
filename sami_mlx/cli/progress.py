"""The command line's view of a run: a progress bar fed by the loop's events."""

from __future__ import annotations

import sys

from tqdm import tqdm

from sami_mlx import events as ev
from sami_mlx.rates import format_rate


class ProgressBar:
    """Consumes events; shows iteration, step, loss, MI bound, tokens/s and peak memory.

    `ranks` > 1: a data-parallel run, whose tokens/s add up every rank's and whose memory is the
    largest rank's.
    """

    def __init__(self, stream=None, ranks: int = 1):
        self.stream = stream or sys.stderr
        self.ranks = ranks
        self.bar: tqdm | None = None
        self.stage_bar: tqdm | None = None
        self.iterations = 0
        self.drift = ""  # the monitor's last reading, shown after the step's numbers

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.StageProgress):
            self.stage(event)
        elif isinstance(event, ev.RunStarted):
            self.iterations = event.iterations
            self.bar = tqdm(
                total=event.total_steps,
                initial=event.resumed_at_step,  # a resumed run continues where it stopped
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                bar_format="{desc} {bar} {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}]{postfix}",
            )
            self.write(
                f"run {event.run_dir}: {event.iterations} iterations, {event.total_steps} steps"
                + (f" (resumed after step {event.resumed_at_step})" if event.resumed_at_step else "")
                + f", N={event.num_variants} variants, {event.trainable_parameters:,} adapter parameters"
                + (
                    f", monitor on {event.monitor_queries} held-out queries (base MI bound "
                    f"{_signed(event.base_heldout_mi)})"
                    if event.monitor_queries
                    else ", monitor off"
                )
                + (f", base held-out ppl {event.base_ppl:.2f}" if event.base_ppl is not None else "")
                + (
                    f", estimated peak memory {event.memory_estimate_gb:.1f} GiB"
                    if event.memory_estimate_gb is not None
                    else ""
                )
                + (f"; data-parallel over {self.ranks} ranks" if self.ranks > 1 else "")
            )
            if event.model_note:
                self.write(event.model_note)
        elif self.bar is None:
            return
        elif isinstance(event, ev.IterationStarted):
            self.bar.set_description(f"iter {event.iteration}/{self.iterations} sampling")
        elif isinstance(event, ev.SamplingProgress):
            self.bar.set_description(f"iter {event.iteration}/{self.iterations} sampling {event.done}/{event.total}")
        elif isinstance(event, ev.SamplesReady):
            dropped = (
                event.dropped_empty
                + event.dropped_identical
                + event.dropped_banned
                + event.dropped_echoed
                + event.dropped_truncated
                + event.dropped_unfinished
            )
            self.write(
                f"iter {event.iteration}: {event.groups} groups kept, {dropped} dropped "
                f"(empty {event.dropped_empty}, identical {event.dropped_identical}, banned {event.dropped_banned}, "
                f"echoing the constitution {event.dropped_echoed}, "
                f"truncated {event.dropped_truncated}, no sentence end {event.dropped_unfinished}); "
                f"mean length {event.mean_length:.1f} tokens, {format_rate(event.tokens_per_sec)}" + _why_empty(event)
            )
            self.bar.set_description(f"iter {event.iteration}/{self.iterations} training")
        elif isinstance(event, ev.StepCompleted):
            self.bar.set_description(f"iter {event.iteration}/{self.iterations} step {event.step}/{event.steps}")
            self.bar.set_postfix_str(
                f"loss {event.loss:.3f} MI {event.mi_bound:+.3f} acc {event.row_accuracy:.2f} "
                f"{format_rate(event.tokens_per_sec)} {event.peak_memory_gb:.2f} GiB{self.drift}",
                refresh=False,
            )
            self.bar.update(1)
        elif isinstance(event, ev.MonitorChecked):
            self.drift = f" drift {_drift(event)}" if event.drift_prompted is not None else ""
            if not event.healthy:
                self.write(
                    f"iter {event.iteration} step {event.step}: drift {_drift(event)} is past the "
                    f"limit {event.limit:g}x"
                )
        elif isinstance(event, ev.IterationCompleted):
            monitor = ""
            if event.drift_prompted is not None:
                monitor = (
                    f"; drift {_drift(event)}, held-out MI {_signed(event.heldout_mi)}, "
                    f"answers {event.mean_length:.1f} tokens ({event.limit_rate:.0%} at the limit), "
                    f"distinct-2 {event.distinct_2:.2f}, repetition {event.repetition:.2f}"
                )
            if event.ppl_ratio is not None:
                monitor += f"; --heldout ppl {event.heldout_ppl:.2f} ({event.ppl_ratio:.2f}x base)"
            self.write(
                f"iter {event.iteration}: loss {event.loss:.3f}, MI bound {event.mi_bound:+.3f} nats, "
                f"row/col accuracy {event.row_accuracy:.2f}/{event.column_accuracy:.2f}{monitor}"
                + ("" if event.healthy else " [unhealthy]")
                + f" -> {event.adapter_dir}"
            )
        elif isinstance(event, ev.RunWarning):
            self.write(f"warning: {event.message}")
        elif isinstance(event, ev.RunCompleted):
            self.bar.close()
            kept = f": {event.adapters}" + (f" ({event.kept})" if event.kept else "") if event.adapters else ""
            self.write(
                f"{'stopped' if event.stopped_early else 'done'} in {event.seconds:.0f}s; "
                f"{event.run_dir}/adapters.safetensors{kept} "
                f"(mlx_lm.generate --model MODEL --adapter-path {event.run_dir})"
            )

    def stage(self, event: ev.StageProgress) -> None:
        """Work around a run (building a model, evaluating) gets a bar of its own."""
        if self.stage_bar is None or self.stage_bar.desc != event.stage:
            if self.stage_bar is not None:
                self.stage_bar.close()
            self.stage_bar = tqdm(total=event.total, desc=event.stage, file=self.stream, dynamic_ncols=True)
        self.stage_bar.n = event.done
        self.stage_bar.set_postfix_str(event.detail, refresh=True)
        if event.done >= event.total:
            self.stage_bar.close()
            self.stage_bar = None

    def close(self) -> None:
        """End any open bar (also after an error), so that what follows starts on its own line."""
        for bar in (self.stage_bar, self.bar):
            if bar is not None:
                bar.close()
        self.stage_bar = self.bar = None

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream)


def _drift(event: ev.MonitorChecked | ev.IterationCompleted) -> str:
    """Both drifts: with the constitution / without one, as perplexity ratios to the base model."""
    return f"{event.drift_prompted:.2f}x/{event.drift_plain:.2f}x"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _why_empty(event: ev.SamplesReady) -> str:
    """When every sampled group was dropped as empty, what that means and what to change."""
    if event.groups or not event.dropped_empty or event.dropped_empty < event.queries_sampled:
        return ""
    return (
        "; every response was empty: the model ended (EOS, or a --stop string) before writing anything, "
        "so look at where the prompt ends (--template, --response-prefix) and at --stop, or try --temperature 0.7"
    )
