"""Screen 2: set up and start a SAMI run, watch it live, stop or resume it, browse past runs."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Header, Input, Label, ProgressBar, Select, Static

from sami_mlx import events as ev
from sami_mlx.config import FIELDS, TrainConfig
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import load_constitution
from sami_mlx.rates import format_rate
from tui.runlog import (
    RunView,
    is_resumable,
    load_run,
    read_samples,
    sample_iterations,
    short_path,
)
from tui.threads import in_fresh_thread
from tui.widgets import MetricPlot, NavTabs, ScoreHeatmap, samples_text

FRAME = 1 / 15  # the dashboard redraws at most 15 times a second


@dataclass(frozen=True)
class Setting:
    """One field of the settings form: the TrainConfig field it sets and how to read it."""

    field: str
    label: str
    kind: type = str
    placeholder: str = ""


SETTINGS = [
    Setting("model", "Model", str, "hub id or model directory"),
    Setting("constitution", "Constitution", str, "constitution file (.yaml/.json)"),
    Setting("queries", "Queries", str, "dialogue, summarization or a file"),
    Setting("iterations", "Iterations", int),
    Setting("steps", "Steps (first iteration)", int),
    Setting("queries_per_step", "Queries per step", int),
    Setting("variants", "Variants", str, "auto, paper, grid or a number"),
    Setting("temperature", "Temperature", float),
    Setting("learning_rate", "Learning rate", float),
    Setting("lora_rank", "LoRA rank", int),
    Setting("max_tokens", "Max tokens", int),
    Setting("out", "Run directory", str, "blank: a new one in the runs folder"),
]
DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def setting_text(value: object) -> str:
    return "" if value is None else str(value)


class RunScreen(Screen):
    """Settings on the left; progress, plots, score matrix and samples of the shown run on the right."""

    AUTO_FOCUS = "#set-model"

    BINDINGS = [
        Binding("ctrl+r", "start", "Start run", tooltip="Start a run with these settings"),
        Binding("ctrl+t", "stop", "Stop run", tooltip="Stop after the current optimizer step (resumable)"),
        Binding("ctrl+y", "resume", "Resume run", tooltip="Continue the shown run from its last step"),
        Binding("ctrl+o", "open_run", "Open run", tooltip="Browse a past run from the runs folder"),
    ]

    class RunEvent(Message, bubble=False):
        """An engine event (as its dict) from the run worker."""

        def __init__(self, event: dict) -> None:
            super().__init__()
            self.event = event

    class RunEnded(Message, bubble=False):
        """The run worker returned (finished or stopped) or raised `error`."""

        def __init__(self, run_dir: str, error: BaseException | None = None) -> None:
            super().__init__()
            self.run_dir, self.error = run_dir, error

    def __init__(self) -> None:
        super().__init__(id="run-screen")
        self.view = RunView()
        self.base_config: dict = {}  # settings the form does not show, from a config file or past run
        self.running = False
        self.quit_when_stopped = False
        self.stop_requested = threading.Event()
        self._redraw: Timer | None = None
        self._samples_iteration: int | None = None
        self._sample_options: list[int] = []
        self._samples_key: tuple | None = None
        self._principles: dict[str, list[str]] = {}
        self._synced: str | None = None  # the editor's file, as last copied into the form

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavTabs("run")
        with Horizontal(id="run-body"):
            with VerticalScroll(id="settings"):
                for s in SETTINGS:
                    yield Label(s.label, classes="field-label")
                    kind = {int: "integer", float: "number"}.get(s.kind, "text")
                    yield Input(
                        setting_text(DEFAULTS[s.field]),
                        placeholder=s.placeholder,
                        type=kind,
                        id=f"set-{s.field}",
                        classes="setting",
                        compact=True,
                    )
                yield Static("", id="settings-status")
            with Vertical(id="dashboard"):
                yield Static("", id="run-title")
                with Horizontal(id="progress-row"):
                    with Vertical(classes="progress-box"):
                        yield Label("iterations", id="iterations-label")
                        yield ProgressBar(show_eta=False, id="iterations-progress")
                    with Vertical(classes="progress-box"):
                        yield Label("steps", id="steps-label")
                        yield ProgressBar(show_eta=False, id="steps-progress")
                    with Vertical(classes="progress-box"):
                        yield Label("sampling", id="sampling-label")
                        yield ProgressBar(show_eta=False, id="sampling-progress")
                yield Static("", id="run-stats")
                with Horizontal(id="plots"):
                    yield MetricPlot("loss", id="loss-plot")
                    yield MetricPlot("MI bound", id="mi-plot")
                with Horizontal(id="tables"):
                    yield DataTable(id="iterations-table", cursor_type="row", zebra_stripes=True)
                    yield ScoreHeatmap(id="heatmap")
                with Horizontal(id="samples-head"):
                    yield Label("Samples of iteration", classes="field-label")
                    yield Select([], prompt="none yet", id="samples-iteration", allow_blank=True, compact=True)
                yield VerticalScroll(Static("", id="samples"), id="samples-scroll")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#iterations-table", DataTable)
        table.add_columns("it", "loss", "MI", "row", "col", "drift×", "MI held", "groups", "len", "no EOS", "dist-2")
        app = self.app
        if app.config:
            self.use_config(app.config, keep_out=True)
        if app.model:
            self.query_one("#set-model", Input).value = app.model
        self.sync_constitution(force=True)
        run = app.run_dir
        if run:
            self.open_run(Path(run))
        else:
            self.render_view()

    def on_screen_resume(self) -> None:
        self.sync_constitution()

    def sync_constitution(self, force: bool = False) -> None:
        """Follow the file open in the constitution editor until the user types another here."""
        box = self.query_one("#set-constitution", Input)
        path = self.app.constitution_path
        if path and (force or not box.value or box.value == self._synced):
            box.value = self._synced = str(short_path(path))

    # ---- settings -------------------------------------------------------------------------

    def settings(self) -> TrainConfig:
        """The form as a resolved TrainConfig; raises SamiError naming the field to fix."""
        values = dict(self.base_config)
        values.pop("out", None)
        for s in SETTINGS:
            raw = self.query_one(f"#set-{s.field}", Input).value.strip()
            if s.kind is str:
                if raw:
                    values[s.field] = raw
                continue
            try:
                values[s.field] = s.kind(raw)
            except ValueError:
                kind = "a whole number" if s.kind is int else "a number"
                raise SamiError(f"{s.label}: {raw!r} is not {kind}") from None
        if "out" not in values:
            values["out"] = str(self.new_run_dir())
        return TrainConfig(**values).resolved()

    def use_config(self, config: dict, keep_out: bool = False) -> None:
        """Settings from a config file or a past run: the form shows the main ones, the rest ride along."""
        self.base_config = {k: v for k, v in config.items() if k in FIELDS and (keep_out or k != "out")}
        for s in SETTINGS:
            if (keep_out or s.field != "out") and config.get(s.field) is not None:
                self.query_one(f"#set-{s.field}", Input).value = setting_text(config[s.field])

    def new_run_dir(self) -> Path:
        root = Path(self.app.runs_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out, n = root / stamp, 1
        while out.exists():
            n += 1
            out = root / f"{stamp}-{n}"
        return out

    @on(Input.Changed, ".setting")
    def setting_changed(self) -> None:
        """Check the form as it is typed: the engine's own message, or what the run will do."""
        try:
            cfg = self.settings()
        except SamiError as e:
            text = Text(str(e), style="red")
        else:
            steps = sum(cfg.steps_in_iteration(t) for t in range(cfg.iterations))
            text = Text(
                f"{plural(cfg.iterations, 'iteration')}, {plural(steps, 'optimizer step')}, "
                f"{plural(cfg.queries_per_step, 'query group')} per step",
                style="dim",
            )
        status = self.query_one("#settings-status", Static)
        if text != status.content:
            status.update(text)

    # ---- actions --------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("start", "open_run"):
            return not self.running
        if action == "stop":
            return self.running and not self.stop_requested.is_set()
        if action == "resume":
            return not self.running and bool(self.view.run_dir) and is_resumable(self.view.run_dir)
        return True

    def action_start(self) -> None:
        try:
            cfg = self.settings()
        except SamiError as e:
            self.app.report_error(e, "Cannot start the run")
            return
        editor = self.app.get_screen("constitution")
        if editor.dirty and editor.path and Path(cfg.constitution).resolve() == editor.path.resolve():
            self.app.report_error(
                SamiError(
                    f"{short_path(editor.path)} has unsaved changes; save it on the "
                    "Constitution screen (F1, ctrl+s) first"
                ),
                "Cannot start the run",
            )
            return
        self.begin(RunView(run_dir=cfg.out, status="starting"))
        self.run_engine(cfg, None)

    def action_resume(self) -> None:
        run_dir = self.view.run_dir
        try:
            view = load_run(run_dir)
        except SamiError as e:
            self.app.report_error(e, "Cannot resume the run")
            return
        self.begin(view)
        self.view.status = "resuming"
        self.run_engine(None, run_dir)

    def action_stop(self) -> None:
        self.stop_requested.set()
        self.notify("stopping after the current optimizer step…")
        self.refresh_bindings()
        self.render_view()

    def action_open_run(self) -> None:
        from tui.modals import RunPicker

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.open_run(path)

        self.app.push_screen(RunPicker(self.app.runs_dir), chosen)

    def open_run(self, path: Path) -> None:
        """Show a past run from its metrics.jsonl and samples."""
        try:
            self.view = load_run(path)
        except SamiError as e:
            self.app.report_error(e, "Cannot open the run")
            return
        self.view.run_dir = str(path)
        self._samples_iteration = None
        self.app.run_dir = str(path)
        self.use_config(self.view.config)
        self.refresh_bindings()
        self.render_view()

    def begin(self, view: RunView) -> None:
        self.view, self.running, self._samples_iteration = view, True, None
        self.stop_requested.clear()
        self.refresh_bindings()
        self.render_view()

    # ---- the worker -----------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="run")
    def run_engine(self, cfg: TrainConfig | None, resume_dir: str | None) -> None:
        """Train (or resume) off the UI thread; every event comes back as a RunEvent message."""
        last_progress = 0.0

        def on_event(event: ev.Event) -> None:
            nonlocal last_progress
            if isinstance(event, ev.SamplingProgress):  # one per finished sequence: coalesce
                now = time.monotonic()
                if now - last_progress < FRAME and event.done < event.total:
                    return
                last_progress = now
            self.post_message(self.RunEvent(event.to_dict()))

        trainer = self.app.trainer
        run_dir = resume_dir or (cfg.out if cfg else "")
        try:
            if resume_dir:
                in_fresh_thread(
                    trainer.resume, resume_dir, callbacks=[on_event], should_stop=self.stop_requested.is_set
                )
            else:
                in_fresh_thread(trainer.train, cfg, callbacks=[on_event], should_stop=self.stop_requested.is_set)
        except Exception as e:  # SamiError, RunAborted or a bug: reported in the app, never a crash
            self.post_message(self.RunEnded(run_dir, e))
        else:
            self.post_message(self.RunEnded(run_dir))

    @on(RunEvent)
    def run_event(self, message: RunEvent) -> None:
        e = message.event
        self.view.apply(e)
        if e["event"] == "RunWarning":
            self.notify(e["message"], title="Run warning", severity="warning", timeout=10)
        self.schedule_render()

    @on(RunEnded)
    def run_ended(self, message: RunEnded) -> None:
        self.running = False
        if self.quit_when_stopped:
            self.app.exit()
            return
        if message.error is not None:
            self.view.status, self.view.reason = "failed", str(message.error)
            self.app.report_error(message.error, "The run failed")
        elif self.view.status == "finished":
            self.notify(f"run finished: {short_path(message.run_dir)}; chat with it on F3")
        elif self.view.status == "stopped":
            self.notify(f"run stopped at step {self.view.global_step}; ctrl+y resumes it")
        if message.run_dir and (Path(message.run_dir) / "config.yaml").exists():
            self.app.run_dir = message.run_dir
        self.refresh_bindings()
        self.render_view()

    # ---- drawing --------------------------------------------------------------------------

    def schedule_render(self) -> None:
        if self._redraw is None:
            self._redraw = self.set_timer(FRAME, self._render_frame)

    def _render_frame(self) -> None:
        self._redraw = None
        self.render_view()

    def render_view(self) -> None:
        v = self.view
        self.render_title()
        its = self.query_one("#iterations-progress", ProgressBar)
        its.update(total=max(v.iterations, 1), progress=v.completed_iterations)
        self.query_one("#iterations-label", Label).update(
            f"iteration {v.iteration}/{v.iterations}" if v.iterations else "iterations"
        )
        steps = self.query_one("#steps-progress", ProgressBar)
        steps.update(total=max(v.iteration_steps, 1), progress=v.step)
        self.query_one("#steps-label", Label).update(
            f"step {v.step}/{v.iteration_steps} (total {v.global_step}/{v.total_steps})" if v.total_steps else "steps"
        )
        sampling = self.query_one("#sampling-progress", ProgressBar)
        done, total = v.sampling or (0, 0)
        sampling.update(total=max(total, 1), progress=done)
        self.query_one("#sampling-label", Label).update(
            f"sampling {done}/{total} responses" if v.sampling else "sampling: idle"
        )
        self.query_one("#run-stats", Static).update(self.stats_text())
        per_it = [v.per_iteration[i] for i in sorted(v.per_iteration)]
        self.query_one("#loss-plot", MetricPlot).show(v.series("loss"), [r["loss"] for r in per_it if "loss" in r])
        self.query_one("#mi-plot", MetricPlot).show(
            v.series("mi_bound"), [r["mi_bound"] for r in per_it if "mi_bound" in r]
        )
        self.render_table()
        self.query_one("#heatmap", ScoreHeatmap).show(v.last_step["scores"] if v.last_step else None)
        self.render_samples()

    def render_title(self) -> None:
        v = self.view
        styles = {
            "running": "bold yellow",
            "starting": "bold yellow",
            "resuming": "bold yellow",
            "finished": "bold green",
            "stopped": "bold magenta",
            "failed": "bold red",
            "incomplete": "bold magenta",
            "idle": "dim",
        }
        title = Text()
        if v.run_dir:
            title.append("Run ", style="bold")
            title.append(short_path(v.run_dir))
            status = v.status
            if self.running and self.stop_requested.is_set():
                status = "stopping"
            title.append(f"  {status}", style=styles.get(v.status, "bold"))
            if v.reason:
                title.append(f"  ({v.reason})", style="dim")
        else:
            title.append(
                "No run yet: fill in the settings and press ctrl+r, or open a past run with ctrl+o", style="dim"
            )
        self.query_one("#run-title", Static).update(title)
        self.sub_title = short_path(v.run_dir) if v.run_dir else ""

    def stats_text(self) -> Text:
        v, s = self.view, self.view.last_step
        out = Text()
        if s is None:
            out.append("no optimizer steps yet", style="dim")
        else:
            n = max(v.num_variants, 1)
            out.append("loss ", style="dim").append(f"{s['loss']:.4f}")
            out.append("   MI ≥ ", style="dim").append(f"{s['mi_bound']:.4f}")
            out.append(f" of log {n} = {math.log(n):.3f} nats", style="dim")
            out.append("   row acc ", style="dim").append(f"{s['row_accuracy']:.0%}")
            out.append("   col acc ", style="dim").append(f"{s['column_accuracy']:.0%}")
            out.append("\ntraining ", style="dim").append(format_rate(s["tokens_per_sec"]))
            out.append("   peak memory ", style="dim").append(f"{s['peak_memory_gb']:.2f} GiB")
            if s.get("kl"):
                out.append("   KL ", style="dim").append(f"{s['kl']:.4f}")
            if s.get("anchor_kl"):
                out.append("   KL without constitution ", style="dim").append(f"{s['anchor_kl']:.4f}")
        last_samples = v.per_iteration.get(v.iteration, {})
        if last_samples.get("sampling_tokens_per_sec"):
            out.append("   sampling ", style="dim").append(format_rate(last_samples["sampling_tokens_per_sec"]))
        if v.base_ppl:
            out.append("   base ppl ", style="dim").append(f"{v.base_ppl:.2f}")
        out.append_text(self.monitor_text())
        for w in v.warnings[-2:]:
            out.append(f"\n⚠ {w}", style="yellow")
        return out

    def monitor_text(self) -> Text:
        """The degeneration monitor's last reading: drift with and without the constitution against
        the limit, the held-out MI bound, and which adapters the run kept."""
        v, m, out = self.view, self.view.monitor, Text()
        if m is None and not v.kept:
            if v.monitor_queries:
                out.append(f"\nmonitor: {v.monitor_queries} held-out queries, no reading yet", style="dim")
            return out
        out.append("\nmonitor ", style="dim")
        if m is not None and m.get("drift_prompted") is not None:
            style = "green" if m["healthy"] else "bold red"
            out.append(f"drift {m['drift_prompted']:.2f}× / {m['drift_plain']:.2f}×", style=style)
            out.append(" with / without constitution", style="dim")
            limit = m.get("limit")
            out.append(f" (limit {limit:g}×)" if limit else " (guard off)", style="dim")
            out.append(f" at iter {m['iteration']} step {m['step']}", style="dim")
            if m.get("heldout_mi") is not None:
                out.append("   held-out MI ", style="dim").append(f"{m['heldout_mi']:+.3f}")
            if m.get("mean_length") is not None:
                out.append("   answers ", style="dim").append(f"{m['mean_length']:.1f} tok")
                out.append(f", {m['limit_rate']:.0%} at limit, rep {m['repetition']:.2f}", style="dim")
        if v.kept:
            out.append("   kept ", style="dim").append(v.kept, style="bold")
        return out

    def render_table(self) -> None:
        table = self.query_one("#iterations-table", DataTable)
        table.clear()

        def f(row: dict, key: str, spec: str) -> str:
            value = row.get(key)
            return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "–"

        for it in sorted(self.view.per_iteration):
            r = self.view.per_iteration[it]
            drift = "–"
            if isinstance(r.get("drift_prompted"), (int, float)):
                drift = f"{r['drift_prompted']:.2f}/{r['drift_plain']:.2f}" + ("" if r.get("healthy", True) else " ✗")
            table.add_row(
                str(it),
                f(r, "loss", ".4f"),
                f(r, "mi_bound", ".4f"),
                f(r, "row_accuracy", ".0%"),
                f(r, "column_accuracy", ".0%"),
                drift,
                f(r, "heldout_mi", "+.3f"),
                f(r, "groups", "d"),
                f(r, "mean_length", ".1f"),
                f(r, "no_eos_rate", ".0%"),
                f(r, "distinct_2", ".2f"),
            )

    def render_samples(self) -> None:
        v = self.view
        found = sorted(set(sample_iterations(v.run_dir) if v.run_dir else []) | set(v.examples))
        select = self.query_one("#samples-iteration", Select)
        if found != self._sample_options:
            self._sample_options = found
            with select.prevent(Select.Changed):
                select.set_options([(f"iter-{i:02d}", i) for i in found])
        # Follow the newest iteration unless the user picked one.
        it = self._samples_iteration if self._samples_iteration in found else (found[-1] if found else None)
        if it is not None and select.value != it:
            with select.prevent(Select.Changed):
                select.value = it
        samples = Path(v.run_dir) / f"iter-{it:02d}" / "samples.jsonl" if v.run_dir and it else None
        key = (
            v.run_dir,
            it,
            samples.stat().st_mtime_ns if samples and samples.is_file() else None,
            len(v.examples.get(it, [])),
        )
        if key == self._samples_key:  # redraw (and reread the file) only when something changed
            return
        self._samples_key = key
        groups = read_samples(v.run_dir, it) if samples else []
        self.query_one("#samples", Static).update(
            samples_text(groups or v.examples.get(it, []), self.principle_names())
        )

    def principle_names(self) -> list[str]:
        """The run's principle names, which the variant labels' signs follow."""
        path = self.view.config.get("constitution")
        if path not in self._principles:
            try:
                self._principles[path] = [p.name for p in load_constitution(path).principles] if path else []
            except SamiError:
                self._principles[path] = []
        return self._principles[path]

    @on(Select.Changed, "#samples-iteration")
    def samples_iteration_chosen(self, event: Select.Changed) -> None:
        self._samples_iteration = event.value if isinstance(event.value, int) else None
        self.render_samples()
