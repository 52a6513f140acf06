"""The command line's view of a run: a progress bar fed by the loop's events."""

from __future__ import annotations

import sys

from tqdm import tqdm

from . import events as ev


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

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.StageProgress):
            self.stage(event)
        elif isinstance(event, ev.RunStarted):
            self.iterations = event.iterations
            self.bar = tqdm(total=event.total_steps, unit="step", file=self.stream, dynamic_ncols=True,
                            bar_format="{desc} {bar} {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}]{postfix}")
            self.write(f"run {event.run_dir}: {event.iterations} iterations, {event.total_steps} steps, "
                       f"N={event.num_variants} variants, {event.trainable_parameters:,} adapter parameters, "
                       f"base held-out ppl {event.base_ppl:.2f}"
                       + (f", estimated peak memory {event.memory_estimate_gb:.1f} GiB"
                          if event.memory_estimate_gb is not None else "")
                       + (f"; data-parallel over {self.ranks} ranks" if self.ranks > 1 else ""))
        elif self.bar is None:
            return
        elif isinstance(event, ev.IterationStarted):
            self.bar.set_description(f"iter {event.iteration}/{self.iterations} sampling")
        elif isinstance(event, ev.SamplingProgress):
            self.bar.set_description(f"iter {event.iteration}/{self.iterations} sampling {event.done}/{event.total}")
        elif isinstance(event, ev.SamplesReady):
            dropped = event.dropped_empty + event.dropped_identical + event.dropped_banned
            self.write(f"iter {event.iteration}: {event.groups} groups kept, {dropped} dropped "
                       f"(empty {event.dropped_empty}, identical {event.dropped_identical}, banned {event.dropped_banned}); "
                       f"mean length {event.mean_length:.1f} tokens, {event.tokens_per_sec:.0f} tok/s")
            self.bar.set_description(f"iter {event.iteration}/{self.iterations} training")
        elif isinstance(event, ev.StepCompleted):
            self.bar.set_description(f"iter {event.iteration}/{self.iterations} step {event.step}/{event.steps}")
            self.bar.set_postfix_str(
                f"loss {event.loss:.3f} MI {event.mi_bound:+.3f} acc {event.row_accuracy:.2f} "
                f"{event.tokens_per_sec:.0f} tok/s {event.peak_memory_gb:.2f} GiB", refresh=False)
            self.bar.update(1)
        elif isinstance(event, ev.IterationCompleted):
            self.write(f"iter {event.iteration}: loss {event.loss:.3f}, MI bound {event.mi_bound:+.3f} nats, "
                       f"row/col accuracy {event.row_accuracy:.2f}/{event.column_accuracy:.2f}, "
                       f"held-out ppl {event.heldout_ppl:.2f} ({event.ppl_ratio:.2f}x base) -> {event.adapter_dir}")
        elif isinstance(event, ev.RunWarning):
            self.write(f"warning: {event.message}")
        elif isinstance(event, ev.RunCompleted):
            self.bar.close()
            self.write(f"done in {event.seconds:.0f}s: adapters in {event.run_dir} "
                       f"(mlx_lm.generate --model MODEL --adapter-path {event.run_dir})")

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
