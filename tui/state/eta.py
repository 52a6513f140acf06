"""Time left in the iteration and in the run, from the rates a live run has shown so far: seconds per
sampled response, per optimizer step, and at each iteration's end (the monitor's check, saving)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text

from tui.state.runlog import RunView


def duration(seconds: float) -> str:
    """45s, 3m 05s, 1h 02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s // 60 % 60:02d}m"


@dataclass
class Eta:
    """Watches a live run's events (with the time each arrived, in seconds) and estimates what is left."""

    sampled: int = 0  # responses sampled in finished sampling phases
    sampling_seconds: float = 0.0
    steps: int = 0  # optimizer steps timed
    step_seconds: float = 0.0
    ends: int = 0  # iteration ends timed (last step to IterationCompleted)
    end_seconds: float = 0.0
    phase_start: float | None = None  # the sampling phase in progress began
    progress: tuple[int, float] = (0, 0.0)  # (done, seconds) of the sampling in progress
    planned: int = 0  # responses the sampling in progress will draw
    tick: float | None = None  # the last step (or the end of sampling) happened
    last: float = 0.0  # the last event arrived

    def observe(self, event: dict, now: float) -> None:
        kind, self.last = event.get("event"), now
        if kind == "RunStarted":
            self.phase_start = self.tick = None
        elif kind == "IterationStarted":
            self.phase_start, self.progress, self.tick = now, (0, 0.0), None
            self.planned = 0
        elif kind == "SamplingProgress" and self.phase_start is not None:
            self.progress, self.planned = (int(event["done"]), now - self.phase_start), int(event["total"])
        elif kind == "SamplesReady":
            if self.phase_start is not None and self.progress[0]:
                self.sampled += max(self.progress[0], self.planned)  # all of them were sampled by now
                self.sampling_seconds += now - self.phase_start
            self.phase_start, self.progress, self.tick = None, (0, 0.0), now
        elif kind == "StepCompleted":
            if self.tick is not None:
                self.steps += 1
                self.step_seconds += now - self.tick
            self.tick = now
        elif kind == "IterationCompleted":
            if self.tick is not None:
                self.ends += 1
                self.end_seconds += now - self.tick
            self.tick = None

    def per_response(self) -> float | None:
        done, seconds = self.sampled + self.progress[0], self.sampling_seconds + self.progress[1]
        return seconds / done if done else None

    def per_step(self) -> float | None:
        return self.step_seconds / self.steps if self.steps else None

    def per_end(self) -> float:
        return self.end_seconds / self.ends if self.ends else 0.0

    def left(self, v: RunView, now: float) -> tuple[float | None, float | None]:
        """Seconds left in the current iteration and in the run (None: not measured yet)."""
        per_response, per_step = self.per_response(), self.per_step()
        if per_step is None:
            return None, None
        if v.sampling is not None:
            if per_response is None:
                return None, None
            done, total = v.sampling
            it_left = (total - done) * per_response + v.iteration_steps * per_step
        else:
            it_left = (v.iteration_steps - v.step) * per_step
        it_left = max(0.0, it_left + self.per_end() - (now - self.last))
        cfg, variants = v.config, max(v.num_variants, 1)
        steps, responses = int(cfg.get("steps", 0)), int(cfg.get("queries_per_step", 0)) * variants
        later = 0.0
        for t in range(v.iteration + 1, v.iterations + 1):  # 1-based iterations still to come
            n = steps * t if cfg.get("schedule", "paper") == "paper" else steps
            later += n * per_step + n * responses * (per_response or 0.0) + self.per_end()
        return it_left, it_left + later


def eta_text(eta: Eta, v: RunView, now: float) -> Text:
    """One line for a live run: when its iteration and the run should end."""
    if v.status not in ("running", "resuming"):
        return Text("")
    it_left, run_left = eta.left(v, now)
    out = Text("ETA ", style="bold")
    if it_left is None or run_left is None:
        return out.append("measuring the first optimizer step…", style="dim")
    out.append(f"iteration {v.iteration}: ", style="dim").append(duration(it_left))
    out.append("   run: ", style="dim").append(duration(run_left))
    return out.append("   (from the rates so far)", style="dim")
