"""Modal dialogs: an error, a choice (the unsaved-changes guard), a path, a run from the runs folder."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from tui.runlog import list_runs, short_path


class ErrorModal(ModalScreen[None]):
    """Where every error the user can act on ends up: a title, the one-line message, OK."""

    BINDINGS = [Binding("escape,enter", "dismiss", "Close")]

    def __init__(self, title: str, message: str) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.message = title, message

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog error"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(Text(self.message), classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", id="ok", variant="error")

    def on_mount(self) -> None:
        self.query_one("#ok", Button).focus()

    @on(Button.Pressed)
    def close(self) -> None:
        self.dismiss(None)


class ChoiceModal(ModalScreen[str]):
    """A question with a few answers; escape answers 'cancel'."""

    BINDINGS = [
        Binding("escape", "dismiss('cancel')", "Cancel"),
        Binding("left", "app.focus_previous", "Previous", show=False),
        Binding("right", "app.focus_next", "Next", show=False),
    ]

    def __init__(self, title: str, message: str, choices: list[tuple[str, str]]) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.message, self.choices = title, message, choices

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(Text(self.message), classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                for n, (key, label) in enumerate(self.choices):
                    yield Button(label, id=f"choice-{key}", variant="primary" if n == 0 else "default")

    def on_mount(self) -> None:
        self.query(Button).first().focus()

    @on(Button.Pressed)
    def choose(self, event: Button.Pressed) -> None:
        self.dismiss(str(event.button.id).removeprefix("choice-"))


class PathModal(ModalScreen["str | None"]):
    """Ask for a file or directory path; enter accepts, escape cancels."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, value: str = "", placeholder: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.value, self.placeholder = title, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(self.value, placeholder=self.placeholder, id="path")
            yield Static("enter to accept, escape to cancel", classes="dialog-hint")

    @on(Input.Submitted)
    def accept(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class RunPicker(ModalScreen["Path | None"]):
    """Pick a run from the runs folder, or type the path of one elsewhere."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, runs_dir: str | Path) -> None:
        super().__init__(classes="dialog-screen")
        self.runs_dir = Path(runs_dir)

    def compose(self) -> ComposeResult:
        runs = list_runs(self.runs_dir)
        with Vertical(classes="dialog wide"):
            yield Label(f"Open a run from {short_path(self.runs_dir)}/", classes="dialog-title")
            if runs:
                yield OptionList(
                    *[
                        Option(
                            Text.assemble((r.path.name, "bold"), f"  {r.status}", (f"  {r.detail}", "dim")),
                            id=str(r.path),
                        )
                        for r in runs
                    ],
                    id="runs",
                )
            else:
                yield Static(f"no runs in {short_path(self.runs_dir)}/ yet", classes="dialog-body")
            yield Input(placeholder="or a run directory path, then enter", id="run-path")

    def on_mount(self) -> None:
        target = self.query("#runs") or self.query("#run-path")
        target.first().focus()

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(Path(str(event.option.id)))

    @on(Input.Submitted)
    def typed(self, event: Input.Submitted) -> None:
        self.dismiss(Path(event.value.strip()).expanduser() if event.value.strip() else None)


class DraftModal(ModalScreen["dict | None"]):
    """What the principle writer needs: an instruct model, the task, how many principles."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, writer: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.writer = writer

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Draft principles with a model", classes="dialog-title")
            yield Label("Writer model (an instruct model: hub id or directory)", classes="field-label")
            yield Input(self.writer, placeholder="e.g. mlx-community/Mistral-7B-Instruct-v0.3-4bit", id="writer")
            yield Label("Task the principles are for", classes="field-label")
            yield Input(placeholder="e.g. answer questions about gardening", id="task")
            yield Label("Number of principles", classes="field-label")
            yield Input("4", type="integer", id="principles")
            yield Static(
                "enter drafts, escape cancels; the draft replaces or extends the principles", classes="dialog-hint"
            )

    def on_mount(self) -> None:
        self.query_one("#task" if self.writer else "#writer", Input).focus()

    @on(Input.Submitted)
    def submit(self) -> None:
        values = {i.id: i.value.strip() for i in self.query(Input)}
        self.dismiss({"writer": values["writer"], "task": values["task"], "principles": int(values["principles"] or 0)})
