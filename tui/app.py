"""The sami-mlx terminal UI: three screens (Constitution, Run, Chat) over the engine's public API."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from textual import events, on
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.widgets import Input

from sami_mlx.errors import RunAborted, SamiError
from tui.chat_screen import ChatScreen
from tui.constitution_screen import ConstitutionScreen
from tui.messages import ConstitutionOpened, ConstitutionSaved, ErrorRaised, RunChosen
from tui.modals import ChoiceModal, ErrorModal, HelpModal, key_name
from tui.run_screen import RunScreen
from tui.state.runlog import short_path
from tui.state.session import Session, Trainer


class SamiApp(App[None]):
    """Edit a constitution, run SAMI and watch it, chat with the checkpoints."""

    CSS_PATH = "sami.tcss"
    TITLE = "sami-mlx"
    # The screens are installed in __init__, each given the Session it shares with the others.
    MODES = {"constitution": "constitution", "run": "run", "chat": "chat"}
    # Screen classes by terminal width, for sami.tcss: under 100 columns (80x24 included) and under 120
    # the screens stack or wrap what sits side by side on a wide terminal.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-medium"), (120, "-wide")]
    BINDINGS = [
        Binding("f1", "switch_mode('constitution')", "Constitution", tooltip="Edit the constitution"),
        Binding("f2", "switch_mode('run')", "Run", tooltip="Start, watch, stop or browse runs"),
        Binding("f3", "switch_mode('chat')", "Chat", tooltip="Chat with the base model or a checkpoint"),
        Binding("ctrl+q", "quit", "Quit", priority=True, tooltip="Quit (asks about unsaved changes or a run)"),
        # Off the footer, which is full at 100 columns; `?` is where users look for help. In a text field
        # `?` is typed unless the field is empty (on_event); the palette's Help works everywhere.
        Binding("question_mark", "help", "Help", show=False, tooltip="The keys of this screen"),
    ]

    def __init__(
        self,
        model: str = "",
        constitution: str | None = None,
        run: str | None = None,
        runs_dir: str = "runs",
        config: dict | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        super().__init__()
        config = config or {}
        if trainer is None:
            from sami_mlx.loop import trainer as engine

            trainer = engine
        self.session = Session(
            trainer=trainer,
            model=model or config.get("model", ""),
            config=config,
            constitution_path=constitution or config.get("constitution"),
            run_dir=run,
            runs_dir=runs_dir,
        )
        self.install_screen(ConstitutionScreen(self.session), "constitution")
        self.install_screen(RunScreen(self.session), "run")
        self.install_screen(ChatScreen(self.session), "chat")
        self.start_mode = "run" if run else "constitution"

    def on_mount(self) -> None:
        self.switch_mode(self.start_mode)

    @property
    def run_dir(self) -> str | None:
        """The run the app is about (the Session's)."""
        return self.session.run_dir

    # ---- what the screens say -------------------------------------------------------------

    @on(ErrorRaised)
    def error_raised(self, message: ErrorRaised) -> None:
        message.stop()
        self.report_error(message.error, message.title)

    @on(RunChosen)
    def run_chosen(self, message: RunChosen) -> None:
        message.stop()
        self.session.run_dir = message.run_dir
        chat = self.get_screen("chat", ChatScreen)
        if chat.is_current:  # chat opened it: show it now (the other screens catch up when shown)
            chat.refresh_source()

    @on(ConstitutionOpened)
    @on(ConstitutionSaved)
    def constitution_chosen(self, message: ConstitutionOpened | ConstitutionSaved) -> None:
        message.stop()
        self.session.constitution_path = message.path

    # ---- one place for errors -------------------------------------------------------------

    def report_error(self, error: BaseException, title: str = "Error") -> None:
        """Show an error in a modal; a user's mistake as its one line, a bug with its type."""
        if isinstance(error, (SamiError, RunAborted)):
            message = str(error)
        else:
            self.log.error(error)
            message = f"{type(error).__name__}: {error}"
        self.push_screen(ErrorModal(title, message))

    # ---- command palette: the bindings, declared once -------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        ours = list(self.binding_commands(screen))
        titles = {command.title for command in ours}
        for command in super().get_system_commands(screen):
            # Textual's Quit and Keys are ours already: Quit from the bindings, Keys as Help (?).
            if command.title not in titles and command.title != "Keys":
                yield command
        yield from ours

    def binding_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The screen's and the app's bindings as palette commands, each once."""
        for owner in (screen, self):
            for binding in owner.BINDINGS:
                if not isinstance(binding, Binding) or not binding.description:
                    continue
                if owner.check_action(binding.action.split("(")[0], ()) is False:
                    continue
                help_text = f"{binding.tooltip or binding.description} ({key_name(binding.key.split(',')[0])})"
                yield SystemCommand(binding.description, help_text, partial(owner.run_action, binding.action))

    async def on_event(self, event: events.Event) -> None:
        # A focused text field takes `?` before any binding sees it (Textual leaves out the bindings a field
        # would consume), and the Run and Chat screens open with the cursor in one. An empty field gives
        # `?` to help, which is what a user pressing it there means; after other text it is the field's.
        if isinstance(event, events.Key) and event.key == "question_mark" and self.empty_field_focused():
            event.stop()
            event.prevent_default()
            self.action_help()
            return
        await super().on_event(event)

    def empty_field_focused(self) -> bool:
        focused = self.screen.focused
        return not isinstance(self.screen, ModalScreen) and isinstance(focused, Input) and not focused.value

    def action_help(self) -> None:
        """Show the keys of the screen in front (not of the help itself)."""
        if not isinstance(self.screen, HelpModal):
            self.push_screen(HelpModal(self.screen))

    # ---- quitting -------------------------------------------------------------------------

    async def action_quit(self) -> None:
        """Quit, but not past unsaved changes or a running run without asking."""
        editor = self.get_screen("constitution", ConstitutionScreen)
        if editor.is_mounted and editor.dirty:
            where = short_path(editor.path) if editor.path else "the new constitution"
            editor.save_or_discard_then(f"Save the changes to {where} before quitting?", self.quit_after_run)
            return
        self.quit_after_run()

    def quit_after_run(self) -> None:
        runner = self.get_screen("run", RunScreen)
        if not (runner.is_mounted and runner.running):
            self.exit()
            return

        def answered(choice: str | None) -> None:
            if choice == "stop":
                runner.quit_when_stopped = True
                runner.action_stop()

        self.push_screen(
            ChoiceModal(
                "A run is in progress",
                "Stop it (within seconds, mid-sampling too; it stays resumable) and quit when it has stopped?",
                [("stop", "Stop and quit"), ("cancel", "Keep running")],
            ),
            answered,
        )
