"""The sami-mlx terminal UI: three screens (Constitution, Run, Chat) over the engine's public API."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Protocol

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from sami_mlx.errors import RunAborted, SamiError
from sami_mlx.inputs.constitution import Constitution, load_constitution
from tui.chat_screen import ChatScreen
from tui.chatting import ChatModels
from tui.constitution_screen import ConstitutionScreen
from tui.modals import ChoiceModal, ErrorModal, HelpModal, key_name
from tui.run_screen import RunScreen
from tui.runlog import short_path


class Trainer(Protocol):
    """What the Run screen runs: the engine's sami_mlx.loop.trainer, or a stand-in with its train() and resume()."""

    @property
    def train(self) -> Callable[..., object]: ...

    @property
    def resume(self) -> Callable[..., object]: ...


class SamiApp(App[None]):
    """Edit a constitution, run SAMI and watch it, chat with the checkpoints."""

    CSS_PATH = "sami.tcss"
    TITLE = "sami-mlx"
    SCREENS = {"constitution": ConstitutionScreen, "run": RunScreen, "chat": ChatScreen}
    MODES = {"constitution": "constitution", "run": "run", "chat": "chat"}
    # Screen classes by terminal width, for sami.tcss: under 100 columns (80x24 included) and under 120
    # the screens stack or wrap what sits side by side on a wide terminal.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-medium"), (120, "-wide")]
    BINDINGS = [
        Binding("f1", "switch_mode('constitution')", "Constitution", tooltip="Edit the constitution"),
        Binding("f2", "switch_mode('run')", "Run", tooltip="Start, watch, stop or browse runs"),
        Binding("f3", "switch_mode('chat')", "Chat", tooltip="Chat with the base model or a checkpoint"),
        Binding("ctrl+q", "quit", "Quit", priority=True, tooltip="Quit (asks about unsaved changes or a run)"),
        # Not priority: in a text field `?` is typed (the palette's Help works there). Off the footer, which
        # is full at 100 columns; `?` is where users look for help.
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
        self.model = model or (config or {}).get("model", "")
        self.config = config or {}  # run settings (TrainConfig fields), as `sami-mlx train -c` reads them
        self.constitution_path = constitution or self.config.get("constitution")
        self.run_dir = run
        self.runs_dir = runs_dir
        if trainer is None:
            from sami_mlx.loop import trainer as engine

            trainer = engine
        self.trainer: Trainer = trainer
        self.chat_models = ChatModels()
        self.start_mode = "run" if run else "constitution"

    def on_mount(self) -> None:
        self.switch_mode(self.start_mode)

    # ---- one place for errors -------------------------------------------------------------

    def report_error(self, error: BaseException, title: str = "Error") -> None:
        """Show an error in a modal; a user's mistake as its one line, a bug with its type."""
        if isinstance(error, (SamiError, RunAborted)):
            message = str(error)
        else:
            self.log.error(error)
            message = f"{type(error).__name__}: {error}"
        self.push_screen(ErrorModal(title, message))

    # ---- shared state ---------------------------------------------------------------------

    def current_constitution(self) -> Constitution:
        """The constitution in the editor (validated), or the file given at start."""
        editor = self.get_screen("constitution", ConstitutionScreen)
        if editor.is_mounted:
            return editor.constitution()
        if self.constitution_path:
            return load_constitution(self.constitution_path)
        raise SamiError("no constitution yet; write one on the Constitution screen (F1)")

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
