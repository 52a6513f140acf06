"""Screen 2: set up and start a SAMI run, watch it live, stop or resume it, browse past runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Checkbox, DataTable, Header, Input, Label, ProgressBar, Select, Static
from textual.worker import get_current_worker

from sami_mlx import events as ev
from sami_mlx.config import TrainConfig
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import load_constitution
from tui.constitution_screen import ConstitutionScreen
from tui.heatmap import ScoreHeatmap, variant_labels
from tui.messages import ErrorRaised, RunChosen
from tui.settings_form import SettingsForm
from tui.state.eta import Eta, eta_text
from tui.state.evaluating import EvalRequest, default_request, failure_line, last_progress
from tui.state.run_dashboard import (
    ITERATION_COLUMNS,
    iteration_rows,
    pairs_table,
    stats_text,
    title_text,
    verdict_rows,
    verdict_table,
)
from tui.state.run_settings import plan_text
from tui.state.runlog import (
    ReplyPair,
    RunResult,
    RunView,
    is_resumable,
    load_run,
    read_kept,
    read_pairs,
    read_result,
    read_samples,
    sample_iterations,
    short_path,
)
from tui.state.session import Session
from tui.state.threads import in_fresh_thread
from tui.widgets import KeysFooter, MetricPlot, NavTabs, samples_text

PAIRS = -1  # the samples list's entry for base-vs-aligned replies (iterations count from 1)
FRAME = 1 / 15  # the dashboard redraws at most 15 times a second


class RunScreen(Screen[None]):
    """Settings on the left; progress, plots, score matrix and samples of the shown run on the right."""

    AUTO_FOCUS = "#set-model"

    BINDINGS = [
        Binding("ctrl+r", "start", "Start run", tooltip="Start a run with these settings"),
        Binding("ctrl+t", "stop", "Stop run", tooltip="Stop within seconds, mid-sampling too (resumable)"),
        Binding("ctrl+y", "resume", "Resume run", tooltip="Continue the shown run from its last step"),
        Binding("ctrl+o", "open_run", "Open run", tooltip="Browse a past run from the runs folder"),
        Binding("ctrl+l", "load_settings", "Load settings", tooltip="Read the settings from a YAML config file"),
        Binding("ctrl+s", "save_settings", "Save settings", tooltip="Write the settings to a YAML config file"),
        Binding("f5", "measure", "Eval", tooltip="Measure the run against its base model (sami-mlx eval)"),
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

    class EvalProgress(Message, bubble=False):
        """What `sami-mlx eval` reported last: its stage and how far it got."""

        def __init__(self, stage: str, done: int, total: int) -> None:
            super().__init__()
            self.stage, self.done, self.total = stage, done, total

    class EvalEnded(Message, bubble=False):
        """`sami-mlx eval` exited with `code`; `message` says why when it failed."""

        def __init__(self, code: int, message: str = "") -> None:
            super().__init__()
            self.code, self.message = code, message

    def __init__(self, session: Session) -> None:
        super().__init__(id="run-screen")
        self.session = session
        self.view = RunView()
        self.eta = Eta()
        self.running = False
        self.quit_when_stopped = False
        self.stop_requested = threading.Event()
        self._redraw: Timer | None = None
        self._samples_iteration: int | None = None
        self._sample_options: list[int] = []
        self._samples_key: tuple | None = None
        self._principles: dict[str | None, list[str]] = {}
        self._synced: str | None = None  # the editor's file, as last copied into the form
        self._verdict: tuple[tuple, RunResult | None, tuple[str, str]] | None = None  # files' key, what they say
        self._pairs: tuple[str, list[ReplyPair]] = ("", [])  # base and aligned replies the run has
        self.measuring: str | None = None  # the run `sami-mlx eval` is measuring now

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavTabs("run")
        with Horizontal(id="run-body"):
            yield SettingsForm(id="settings")
            with VerticalScroll(id="dashboard"):  # the verdict card and samples outgrow a small terminal
                yield Static("", id="run-title")
                yield Static("", id="verdict")
                with Horizontal(id="eval-row"):
                    yield Label("", id="eval-label")
                    yield ProgressBar(show_eta=False, id="eval-progress")
                with Horizontal(id="progress-row"):
                    with Vertical(classes="progress-box"):
                        yield Label("iterations", id="iterations-label")
                        yield ProgressBar(show_eta=False, id="iterations-progress")
                    with Vertical(classes="progress-box"):
                        yield Label("steps", id="steps-label")
                        yield ProgressBar(show_eta=False, id="steps-progress")
                    with Vertical(classes="progress-box", id="sampling-box"):
                        yield Label("sampling", id="sampling-label")
                        yield ProgressBar(show_eta=False, id="sampling-progress")
                yield Static("", id="run-eta")
                yield Static("", id="run-stats")
                with Horizontal(id="plots"):
                    yield MetricPlot("loss", id="loss-plot")
                    yield MetricPlot("train MI bound", id="mi-plot")
                with Horizontal(id="tables"):
                    yield DataTable(id="iterations-table", cursor_type="row", zebra_stripes=True)
                    yield ScoreHeatmap(id="heatmap")
                with Horizontal(id="samples-head"):
                    yield Label("Samples of iteration", classes="field-label")
                    yield Select([], prompt="none yet", id="samples-iteration", allow_blank=True, compact=True)
                yield VerticalScroll(Static("", id="samples"), id="samples-scroll")
        yield KeysFooter()

    def on_mount(self) -> None:
        table = self.query_one("#iterations-table", DataTable)
        table.add_columns(*ITERATION_COLUMNS)
        session = self.session
        if session.config:
            try:
                self.use_config(session.config, keep_out=True)
            except SamiError as e:
                self.report(e, "Cannot use the settings")
        if session.model:
            self.query_one("#set-model", Input).value = session.model
        self.sync_constitution(force=True)
        self.set_interval(1, self.render_eta)  # the ETA counts down between events
        run = session.run_dir
        if run:
            self.open_run(Path(run))
        else:
            self.render_view()

    def on_screen_resume(self) -> None:
        self.sync_constitution()

    def sync_constitution(self, force: bool = False) -> None:
        """Follow the file open in the constitution editor until the user types another here."""
        box = self.query_one("#set-constitution", Input)
        path = self.session.constitution_path
        if path and (force or not box.value or box.value == self._synced):
            box.value = self._synced = str(short_path(path))

    def report(self, error: BaseException, title: str) -> None:
        self.post_message(ErrorRaised(error, title))

    # ---- settings -------------------------------------------------------------------------

    @property
    def form(self) -> SettingsForm:
        return self.query_one(SettingsForm)

    def settings(self) -> TrainConfig:
        """The form as a resolved TrainConfig; raises SamiError naming the field to fix."""
        return self.form.config(str(self.new_run_dir()))

    def use_config(self, config: dict, keep_out: bool = False) -> None:
        """Settings from a config file or a past run into the form (a past run's directory left out)."""
        self.form.show({k: v for k, v in config.items() if keep_out or k != "out"})

    def new_run_dir(self) -> Path:
        root = Path(self.session.runs_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out, n = root / stamp, 1
        while out.exists():
            n += 1
            out = root / f"{stamp}-{n}"
        return out

    @on(Input.Changed, ".setting")
    @on(Select.Changed, ".setting")
    @on(Checkbox.Changed, ".setting")
    def setting_changed(self) -> None:
        """Check the form as it is changed: the engine's own message (its field marked), or the plan."""
        try:
            cfg = self.settings()
        except SamiError as e:
            self.form.flag(e)
            self.form.show_status(Text(str(e), style="red"))
        else:
            self.form.flag(None)
            self.form.show_status(plan_text(cfg))

    def action_load_settings(self) -> None:
        self.form.ask_load()

    def action_save_settings(self) -> None:
        self.form.ask_save()

    # ---- actions --------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("start", "open_run"):
            return not self.running
        if action == "stop":
            return self.running and not self.stop_requested.is_set()
        if action == "measure":
            return bool(self.view.run_dir) and not self.view.live and self.measuring is None
        if action == "resume":
            return not self.running and bool(self.view.run_dir) and is_resumable(self.view.run_dir)
        return True

    def action_start(self) -> None:
        try:
            cfg = self.settings()
        except SamiError as e:
            self.report(e, "Cannot start the run")
            return
        editor = self.app.get_screen("constitution", ConstitutionScreen)
        if editor.dirty and editor.path and Path(cfg.constitution).resolve() == editor.path.resolve():
            self.report(
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
            self.report(e, "Cannot resume the run")
            return
        self.begin(view)
        self.view.status = "resuming"
        self.run_engine(None, run_dir)

    def action_stop(self) -> None:
        self.stop_requested.set()
        self.notify("stopping… (the run stays resumable)")
        self.refresh_bindings()
        self.render_view()

    def action_open_run(self) -> None:
        from tui.modals import RunPicker

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.open_run(path)

        self.app.push_screen(RunPicker(self.session.runs_dir), chosen)

    def open_run(self, path: Path) -> None:
        """Show a past run from its metrics.jsonl and samples."""
        try:
            self.view = load_run(path)
        except SamiError as e:
            self.report(e, "Cannot open the run")
            return
        self.view.run_dir = str(path)
        self._samples_iteration = None
        self.post_message(RunChosen(path))
        try:
            self.use_config(self.view.config)
        except SamiError as e:
            self.report(e, "Cannot show the run's settings")
        self.refresh_bindings()
        self.render_view()

    def begin(self, view: RunView) -> None:
        self.view, self.running, self._samples_iteration = view, True, None
        self.eta = Eta()
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

        trainer = self.session.trainer
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
        self.eta.observe(e, time.monotonic())
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
            self.report(message.error, "The run failed")
        elif self.view.status == "finished":
            self.notify(f"run finished: {short_path(message.run_dir)}; chat with it on F3")
        elif self.view.status == "stopped":
            self.notify(f"run stopped at step {self.view.global_step}; ctrl+y resumes it")
        if message.run_dir and (Path(message.run_dir) / "config.yaml").exists():
            self.post_message(RunChosen(message.run_dir))
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
        self.query_one("#sampling-box").display = v.live  # a past run samples nothing: no idle 0% bar
        self.render_verdict()
        self.query_one("#run-stats", Static).update(stats_text(v))
        per_it = [v.per_iteration[i] for i in sorted(v.per_iteration)]
        self.query_one("#loss-plot", MetricPlot).show(v.series("loss"), [r["loss"] for r in per_it if "loss" in r])
        self.query_one("#mi-plot", MetricPlot).show(
            v.series("mi_bound"), [r["mi_bound"] for r in per_it if "mi_bound" in r]
        )
        self.render_table()
        self.render_eta()
        self.render_heatmap()
        self.render_samples()

    def render_title(self) -> None:
        v = self.view
        stopping = self.running and self.stop_requested.is_set()
        self.query_one("#run-title", Static).update(title_text(v, stopping))
        self.sub_title = short_path(v.run_dir) if v.run_dir else ""

    def render_verdict(self) -> None:
        """The verdict card, from the run's result files and state.json (re-read when they change)."""
        v, box = self.view, self.query_one("#verdict", Static)
        box.display = bool(v.run_dir)
        if not v.run_dir:
            self._pairs = ("", [])
            return
        run = Path(v.run_dir)
        files = [run / "demo.json", run / "state.json", *sorted((run / "eval").glob("*.json"))]
        key = (v.run_dir, v.kept_name, tuple((f.name, f.stat().st_mtime_ns) for f in files if f.is_file()))
        if self._verdict is None or self._verdict[0] != key:
            kept = read_kept(run)
            self._verdict = (key, read_result(run, kept[0] or v.kept_name), kept)
            self._pairs = read_pairs(run, kept[0] or v.kept_name)
        _, result, kept = self._verdict
        box.update(verdict_table(verdict_rows(v, result, kept)))
        box.border_title = "Verdict"

    # ---- measuring the run: `sami-mlx eval` against the base ------------------------------

    def action_measure(self) -> None:
        """Ask for held-out queries and a judge, then run `sami-mlx eval` on the run's kept adapters (the
        dialog copies the command too); the verdict card reads the result file when it is written."""
        from tui.modals import EvalModal

        run_dir = self.view.run_dir
        if (Path(run_dir) / "demo.json").is_file():  # a toy world's run: its own checker is the judge
            self.notify("the world's checker measured this run already (demo.json, in the verdict card)")
            return
        request = default_request(run_dir, read_kept(run_dir)[0] or self.view.kept_name)

        def chosen(request: EvalRequest | None) -> None:
            if request is None:
                return
            try:
                request.check()
            except SamiError as e:
                self.report(e, "Cannot measure the run")
                return
            self.measuring = request.run_dir
            self.show_eval("starting sami-mlx eval…", 0, 0)
            self.refresh_bindings()
            self.measure(request)

        self.app.push_screen(EvalModal(request), chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="eval")
    def measure(self, request: EvalRequest) -> None:
        """Run `sami-mlx eval` in a process of its own (its MLX memory goes with it); its progress bars come
        back as EvalProgress messages, its exit as EvalEnded. Cancelling the worker ends the process."""
        import os
        import subprocess

        worker = get_current_worker()
        process = subprocess.Popen(
            request.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        assert process.stderr is not None
        printed, shown = "", None
        while True:
            chunk = os.read(process.stderr.fileno(), 4096)
            if not chunk:
                break
            printed = (printed + chunk.decode(errors="replace"))[-20000:]
            progress = last_progress(printed)
            if progress and progress != shown:
                shown = progress
                self.post_message(self.EvalProgress(*progress))
            if worker.is_cancelled:
                process.terminate()
                break
        code = process.wait()
        self.post_message(self.EvalEnded(code, "" if code == 0 else failure_line(printed)))

    def show_eval(self, text: str, done: int, total: int) -> None:
        self.query_one("#eval-row").display = bool(text)
        self.query_one("#eval-label", Label).update(text)
        self.query_one("#eval-progress", ProgressBar).update(total=max(total, 1), progress=done)

    @on(EvalProgress)
    def eval_progress(self, message: EvalProgress) -> None:
        self.show_eval(f"measuring: {message.stage} {message.done}/{message.total}", message.done, message.total)

    @on(EvalEnded)
    def eval_ended(self, message: EvalEnded) -> None:
        run_dir, self.measuring = self.measuring, None
        self.show_eval("", 0, 0)
        self.refresh_bindings()
        if message.code != 0:
            self.report(SamiError(f"sami-mlx eval: {message.message}"), "The run could not be measured")
            return
        self.notify(f"measured {short_path(run_dir or '')}: the verdict card shows the result", title="Measured")
        self._verdict = None  # read the new eval file now
        self.render_verdict()

    def render_eta(self) -> None:
        box = self.query_one("#run-eta", Static)
        text = eta_text(self.eta, self.view, time.monotonic()) if self.running else Text("")
        if text != box.content:
            box.update(text)
        box.display = bool(text)

    def render_heatmap(self) -> None:
        """The last step's score matrix (its first query group's), rows and columns labelled by its
        variants' signs, captioned with that group's query where the run recorded it."""
        step = self.view.last_step
        scores = step["scores"] if step else []
        labels = step.get("variants") if step else None
        if not labels:
            labels = variant_labels(len(scores), self.view.config, len(self.principle_names()))
        group = ""
        if step and scores:
            where = f"step {step.get('global_step', step.get('step', '?'))}"
            query = step.get("query") or ""
            # runs from before StepCompleted carried the query say only which step the group is from
            group = f"{where}, query: {query}" if query else f"first query group of {where}"
        self.query_one("#heatmap", ScoreHeatmap).show(scores, labels, group)

    def render_table(self) -> None:
        table = self.query_one("#iterations-table", DataTable)
        table.clear()
        for row in iteration_rows(self.view):
            table.add_row(*row)

    def render_samples(self) -> None:
        v = self.view
        found = sorted(set(sample_iterations(v.run_dir) if v.run_dir else []) | set(v.examples))
        select = self.query_one("#samples-iteration", Select)
        source, pairs = self._pairs
        options = [*found, PAIRS] if pairs else found
        if options != self._sample_options:
            self._sample_options = options
            with select.prevent(Select.Changed):
                select.set_options([(f"iter-{i:02d}" if i != PAIRS else "base vs aligned", i) for i in options])
        if pairs and self._samples_iteration == PAIRS:  # the same queries, base and aligned side by side
            if select.value != PAIRS:
                with select.prevent(Select.Changed):
                    select.value = PAIRS
            if self._samples_key != (v.run_dir, PAIRS, source, len(pairs)):
                self._samples_key = (v.run_dir, PAIRS, source, len(pairs))
                self.query_one("#samples", Static).update(pairs_table(source, pairs))
            return
        # Follow the newest iteration unless the user picked one.
        it = self._samples_iteration if self._samples_iteration in found else (found[-1] if found else None)
        if it is not None and select.value != it:
            with select.prevent(Select.Changed):
                select.value = it
        samples = Path(v.run_dir) / f"iter-{it:02d}" / "samples.jsonl" if v.run_dir and it else None
        examples = v.examples.get(it, []) if it is not None else []
        key = (v.run_dir, it, samples.stat().st_mtime_ns if samples and samples.is_file() else None, len(examples))
        if key == self._samples_key:  # redraw (and reread the file) only when something changed
            return
        self._samples_key = key
        groups = read_samples(v.run_dir, it) if samples and it else []
        live = v.sampling is not None and it == v.iteration  # sampling now: newest groups first
        shown = (groups or examples)[::-1] if live else groups or examples
        self.query_one("#samples", Static).update(samples_text(shown, self.principle_names()))

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
        self._samples_key = None
        self.render_samples()
