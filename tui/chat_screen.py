"""Screen 3: chat with the base model or any iteration of a run, alone or side by side with base."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Checkbox, Header, Input, Label, Select, Static
from textual.worker import get_current_worker

from sami_mlx.chat import PromptFormat, PromptStyle, constitution_text, context_length, stream_reply
from sami_mlx.checkpoints import Checkpoint, list_checkpoints
from sami_mlx.config import check_sampling
from sami_mlx.config_file import load_run_config
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import Constitution, load_constitution
from tui.constitution_screen import ConstitutionScreen
from tui.messages import ErrorRaised, RunChosen
from tui.state.chatting import checkpoint_label, model_name, run_checkpoints
from tui.state.runlog import kept_name, short_path
from tui.state.session import Session
from tui.state.threads import in_fresh_thread
from tui.widgets import ChatBubble, KeysFooter, NavTabs

FRAME = 1 / 15  # streamed text is redrawn at most 15 times a second


@dataclass(frozen=True)
class ChatRequest:
    """What the reply worker needs from the controls."""

    checkpoint: Checkpoint
    constitution: str | None
    style: PromptStyle
    temperature: float
    max_tokens: int


class ChatScreen(Screen):
    """A transcript per model (one, or base and checkpoint side by side) and a message box."""

    AUTO_FOCUS = "#message"

    BINDINGS = [
        Binding(
            "ctrl+t",
            "toggle_box('use-constitution')",
            "Constitution on/off",
            tooltip="Put the constitution in the prompt, or leave it out",
        ),
        Binding("ctrl+b", "toggle_box('side-by-side')", "Side by side", tooltip="Base model next to the checkpoint"),
        Binding("ctrl+l", "clear", "Clear"),
        Binding("ctrl+o", "open_run", "Open run"),
        Binding("escape", "stop_reply", "Stop reply"),
    ]

    class Status(Message, bubble=False):
        """What the chat worker is doing (loading a model, generating)."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class ReplyDelta(Message, bubble=False):
        """The reply of one side so far; `done` marks the last one."""

        def __init__(self, side: str, text: str, done: bool = False) -> None:
            super().__init__()
            self.side, self.text, self.done = side, text, done

    class ChatFailed(Message, bubble=False):
        """The chat worker could not load the model or generate."""

        def __init__(self, error: BaseException) -> None:
            super().__init__()
            self.error = error

    def __init__(self, session: Session) -> None:
        super().__init__(id="chat-screen")
        self.session = session
        self.model = ""
        self.checkpoints: list[Checkpoint] = []
        self.kept = ""  # the run's kept checkpoint, marked "(kept)" and chosen first
        self.constitution: Constitution | None = None  # the run's, from its config.yaml
        self.constitution_problem = ""
        self.history: dict[str, list[dict]] = {"base": [], "main": []}
        self.pending: dict[str, ChatBubble] = {}
        self.generating = False
        self._source: tuple | None = None
        self.prompt_style = PromptStyle()

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavTabs("chat")
        with Horizontal(id="chat-controls"):  # one row when wide; sami.tcss makes it a grid on small terminals
            yield Static("", id="chat-source")
            yield Select([], prompt="checkpoint", id="checkpoint", allow_blank=True, compact=True)
            yield Checkbox("constitution in prompt", id="use-constitution")
            yield Checkbox("side by side with base", id="side-by-side")
            with Horizontal(id="chat-numbers"):
                yield Label("temp", classes="field-label")
                yield Input("0", type="number", id="chat-temperature", compact=True)
                yield Label("max tokens", classes="field-label")
                yield Input("128", type="integer", id="chat-max-tokens", compact=True)
        yield Static("", id="chat-prompt")
        with Horizontal(id="transcripts"):
            with Vertical(id="column-base", classes="column"):
                yield Static("base", classes="column-title")
                yield VerticalScroll(id="transcript-base", classes="transcript")
            with Vertical(id="column-main", classes="column"):
                yield Static("", classes="column-title", id="main-title")
                yield VerticalScroll(id="transcript-main", classes="transcript")
        yield Static("", id="chat-status")
        yield Input(placeholder="Message (enter sends)", id="message")
        yield KeysFooter()

    def on_mount(self) -> None:
        self.query_one("#column-base").display = False
        self.refresh_source()

    def on_screen_resume(self) -> None:
        self.refresh_source()

    # ---- which model and checkpoints ------------------------------------------------------

    def refresh_source(self) -> None:
        """The model, checkpoints and constitution to offer: the current run's as it trained (new
        iterations too), else --model's base with the editor's constitution. A switch to another run
        (one started on the Run screen, say) clears the transcripts and says so, so no reply stays under
        a label that no longer names its model."""
        app = self.session  # what the app is about: its run, or --model
        model, checkpoints, style, kept = app.model or "", list_checkpoints(None), PromptStyle(), ""
        constitution: Constitution | None = None
        problem = ""
        if app.run_dir:
            try:
                cfg = load_run_config(app.run_dir, flag="")
                kept = kept_name(app.run_dir)
                model, checkpoints, style = cfg.model, run_checkpoints(app.run_dir, kept), PromptStyle.of_config(cfg)
                constitution, problem = self.run_constitution(cfg.constitution)
            except SamiError as e:
                if (app.run_dir, app.model) != self._source:
                    self.post_message(ErrorRaised(e, "Cannot chat with this run"))
        source, changed = (app.run_dir, app.model), (checkpoints, kept) != (self.checkpoints, self.kept)
        if self._source is not None and source != self._source:
            self.source_switched(app.run_dir)
        self.model, self.prompt_style, self.constitution, self.constitution_problem = (
            model,
            style,
            constitution,
            problem,
        )
        if changed or source != self._source:
            select = self.query_one("#checkpoint", Select)
            keep = select.value if source == self._source else None
            self.checkpoints, self.kept = checkpoints, kept
            with select.prevent(Select.Changed):
                select.set_options([(checkpoint_label(c, kept), c.name) for c in checkpoints])
            names = [c.name for c in checkpoints]
            if names:  # the user's pick, else the adapters the run kept, else the newest
                select.value = keep if keep in names else kept if kept in names else names[-1]
        if source != self._source:  # a run's chat starts as it trained: with its constitution
            self.query_one("#use-constitution", Checkbox).value = bool(app.run_dir and constitution)
        self._source = source
        parts = [f"model {model_name(model)}" if model else "no model: start with --model or open a run"]
        if app.run_dir:
            parts.append(f"run {short_path(app.run_dir)}")
        self.query_one("#chat-source", Static).update(Text("  ·  ".join(parts), style="bold"))
        self.update_titles()
        self.show_prompt()

    @on(Checkbox.Changed, "#use-constitution")
    def show_prompt(self) -> None:
        """Say how the prompt is written: as the run trained (its constitution, template, chat template)."""
        on = self.query_one("#use-constitution", Checkbox).value
        style, c, out = self.prompt_style, self.constitution, Text(style="dim")
        if not self.session.run_dir:
            out.append("prompt: " + ("the editor's constitution (F1)" if on else "no constitution"))
        elif c is None:
            out.append(f"prompt: {self.constitution_problem or 'no constitution'}", style="red")
        elif on:
            out.append("prompt as the run trained: its constitution ")
            out.append(f"{c.name or 'unnamed'} ({len(c.principles)} principles)", style="bold")
            out.append(f" in template {Path(style.template).name if style.template else 'the built-in one'}")
            out.append(", through the chat template" if style.chat_template else ", plain text (no chat template)")
        else:
            out.append("prompt: no constitution, unlike training (ctrl+t puts the run's back)")
        self.query_one("#chat-prompt", Static).update(out)

    def run_constitution(self, path: str) -> tuple[Constitution | None, str]:
        """The run's own constitution file (read-only here: chat never writes it), or what is wrong with it."""
        try:
            return load_constitution(path), ""
        except SamiError as e:
            return None, f"its constitution cannot be read ({e})"

    def source_switched(self, run_dir: str | None) -> None:
        """Another run (or none) is now the one to chat with: start the transcripts afresh and tell the user."""
        had = any(self.history.values()) or bool(self.query(ChatBubble))
        if self.generating:
            self.workers.cancel_group(self, "chat")
        self.history = {"base": [], "main": []}
        for box in self.query(".transcript"):
            box.remove_children()
        where = f"run {short_path(run_dir)}" if run_dir else "the base model"
        self.notify(
            f"chat now talks to {where}" + ("; the earlier replies were cleared" if had else ""),
            title="Chat switched",
            severity="warning" if had else "information",
        )

    def checkpoint(self) -> Checkpoint | None:
        value = self.query_one("#checkpoint", Select).value
        return next((c for c in self.checkpoints if c.name == value), None)

    @on(Select.Changed, "#checkpoint")
    def checkpoint_changed(self) -> None:
        self.update_titles()

    def update_titles(self) -> None:
        c = self.checkpoint()
        self.query_one("#main-title", Static).update(checkpoint_label(c, self.kept) if c else "no checkpoint")
        self.sub_title = f"{model_name(self.model)} · {c.name}" if c and self.model else ""

    # ---- actions --------------------------------------------------------------------------

    def action_toggle_box(self, checkbox: str) -> None:
        box = self.query_one(f"#{checkbox}", Checkbox)
        box.value = not box.value

    @on(Checkbox.Changed, "#side-by-side")
    def side_by_side_changed(self, event: Checkbox.Changed) -> None:
        self.query_one("#column-base").display = event.value
        if not event.value:  # the base column starts afresh next time
            self.history["base"] = []
            self.query_one("#transcript-base").remove_children()

    def action_clear(self) -> None:
        if self.generating:
            self.notify("wait for the reply (or press escape) before clearing", severity="warning")
            return
        self.history = {"base": [], "main": []}
        for box in self.query(".transcript"):
            box.remove_children()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop_reply":
            return self.generating
        return True

    def action_stop_reply(self) -> None:
        if self.generating:
            self.workers.cancel_group(self, "chat")

    def action_open_run(self) -> None:
        from tui.modals import RunPicker

        def chosen(path: Path | None) -> None:
            if path is not None:
                try:
                    load_run_config(path, flag="")
                except SamiError as e:
                    self.post_message(ErrorRaised(e, "Cannot chat with this run"))
                    return
                self.post_message(RunChosen(path))  # the app makes it the session's run and refreshes this

        self.app.push_screen(RunPicker(self.session.runs_dir), chosen)

    @on(Input.Submitted, "#chat-temperature, #chat-max-tokens")
    def setting_entered(self) -> None:
        self.query_one("#message", Input).focus()

    @on(Input.Submitted, "#message")
    def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.generating:
            self.notify("still replying; press escape to stop it", severity="warning")
            return
        try:
            request = self.request()
        except SamiError as e:
            self.post_message(ErrorRaised(e, "Cannot send"))
            return
        event.input.value = ""
        sides = ["base", "main"] if self.query_one("#side-by-side", Checkbox).value else ["main"]
        for side in sides:
            self.history[side].append({"role": "user", "content": text})
            box = self.query_one(f"#transcript-{side}", VerticalScroll)
            reply = ChatBubble("assistant")
            box.mount_all([ChatBubble("user", text), reply])
            box.scroll_end(animate=False)
            self.pending[side] = reply
            reply.show("", done=False)
        self.generating = True
        self.refresh_bindings()
        self.reply(sides, {s: list(self.history[s]) for s in sides}, request)

    def request(self) -> ChatRequest:
        """Everything the worker needs, read from the controls; raises SamiError for a bad one."""
        checkpoint = self.checkpoint()
        if not self.model or checkpoint is None:
            raise SamiError("no model to chat with: start `sami-mlx tui --model MODEL`, or open a run (ctrl+o)")
        if self.query_one("#side-by-side", Checkbox).value and checkpoint.adapter_path is None:
            raise SamiError("side by side compares the base model with an iteration; pick one in the checkpoint list")
        constitution = None
        if self.query_one("#use-constitution", Checkbox).value:
            if self.session.run_dir:  # the run's own, as it trained, whatever the editor holds
                if self.constitution is None:
                    raise SamiError(f"{self.constitution_problem or 'the run has no constitution'}; untick it")
                constitution = constitution_text(self.constitution)
            else:
                try:
                    c = self.app.get_screen("constitution", ConstitutionScreen).current()
                except SamiError as e:
                    raise SamiError(f"the constitution has an error ({e}); fix it on F1 or untick it") from None
                constitution = constitution_text(c)
        try:
            temperature = float(self.query_one("#chat-temperature", Input).value or 0)
            max_tokens = int(self.query_one("#chat-max-tokens", Input).value or 0)
        except ValueError:
            raise SamiError("temp must be a number and max tokens a whole number") from None
        check_sampling(temperature, max_tokens=max_tokens, names=("temp", "top p", "max tokens"))
        return ChatRequest(checkpoint, constitution, self.prompt_style, temperature, max_tokens)

    # ---- the worker -----------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat")
    def reply(self, sides: list[str], history: dict[str, list[dict]], request: ChatRequest) -> None:
        """Load the checkpoint (once) and stream each side's reply, throttled to 15 Hz."""
        worker = get_current_worker()
        try:
            in_fresh_thread(self._generate, worker, sides, history, request)
        except Exception as e:  # a bad adapter, a missing model: shown in the app, not a crash
            self.post_message(self.ChatFailed(e))
        finally:
            self.post_message(self.Status(""))

    def _generate(self, worker, sides: list[str], history: dict[str, list[dict]], request: ChatRequest) -> None:
        checkpoint, max_tokens, temperature = request.checkpoint, request.max_tokens, request.temperature
        models = self.session.chat_models
        with models.lock:
            self.post_message(self.Status(f"loading {checkpoint.name}…"))
            model, tokenizer = models.load(self.model, checkpoint)
            fmt = PromptFormat.choose(tokenizer, request.style)
            context = context_length(self.model)
            limit = context - max_tokens if context else None
            for side in sides:
                who = checkpoint_label(checkpoint, self.kept) if side == "main" else "base"
                self.post_message(self.Status(f"{who} is replying… (escape stops)"))
                with models.base_of(checkpoint) if side == "base" else nullcontext():
                    ids = fmt.encode(tokenizer, history[side], request.constitution, limit)
                    flt, shown = fmt.stop_filter(), 0.0
                    for _ in stream_reply(
                        model, tokenizer, ids, flt, max_tokens, temperature, should_stop=lambda: worker.is_cancelled
                    ):
                        if time.monotonic() - shown >= FRAME:
                            shown = time.monotonic()
                            self.post_message(self.ReplyDelta(side, flt.text))
                text = flt.text.rstrip() if flt.stopped else flt.text  # nothing dangling before a stop string
                self.post_message(self.ReplyDelta(side, text, done=True))
                if worker.is_cancelled:
                    break

    @on(Status)
    def status(self, message: Status) -> None:
        self.query_one("#chat-status", Static).update(Text(message.text, style="dim italic"))
        if not message.text:
            self.finish()

    @on(ReplyDelta)
    def reply_delta(self, message: ReplyDelta) -> None:
        widget = self.pending.get(message.side)
        if widget is None:
            return
        widget.show(message.text, done=message.done)
        if isinstance(widget.parent, Widget):  # the side's transcript
            widget.parent.scroll_end(animate=False)
        if message.done:
            self.history[message.side].append({"role": "assistant", "content": message.text})
            del self.pending[message.side]

    @on(ChatFailed)
    def failed(self, message: ChatFailed) -> None:
        self.post_message(ErrorRaised(message.error, "The model could not reply"))

    def finish(self) -> None:
        """The worker is done: close replies that never started (stopped or failed)."""
        for side, widget in list(self.pending.items()):
            widget.show(widget.text or "(no reply)")
            if self.history[side] and self.history[side][-1]["role"] == "user":
                self.history[side].pop()  # drop the unanswered user turn (gone already if chat switched)
        self.pending.clear()
        self.generating = False
        self.refresh_bindings()
