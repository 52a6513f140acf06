"""Modal dialogs: an error, a choice (the unsaved-changes guard), a path, a run from the runs folder, the
keys of a screen."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.keys import format_key
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from tui.state.evaluating import EvalRequest
from tui.state.runlog import list_runs, short_path


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


class EvalModal(ModalScreen["EvalRequest | None"]):
    """Measure a run against its base model: held-out queries, a judge model, how many queries. Enter
    runs `sami-mlx eval` on the Run screen; the command is shown (and copied) for running it elsewhere."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, request: EvalRequest) -> None:
        super().__init__(classes="dialog-screen")
        self.request = request

    def compose(self) -> ComposeResult:
        r = self.request
        with Vertical(classes="dialog wide"):
            yield Label(
                f"Measure {r.checkpoint or 'the newest checkpoint'} against the base model", classes="dialog-title"
            )
            yield Label("Held-out queries (.jsonl, text file or built-in set)", classes="field-label")
            yield Input(short_path(r.queries) if r.queries else "", id="eval-queries")
            yield Label("Judge model (hub id or directory; a local mlx-lm model)", classes="field-label")
            yield Input(short_path(r.judge) if r.judge else "", id="eval-judge")
            yield Label("Queries to judge (empty: all)", classes="field-label")
            yield Input(str(r.limit or ""), type="integer", id="eval-limit")
            yield Static("", id="eval-command", classes="dialog-hint")
            yield Static("enter measures here, escape cancels; the command above is copied", classes="dialog-hint")

    def on_mount(self) -> None:
        self.show_command()

    def read(self) -> EvalRequest:
        values = {str(i.id).removeprefix("eval-"): i.value.strip() for i in self.query(Input)}
        limit = int(values["limit"]) if values["limit"].lstrip("-").isdigit() else None
        return EvalRequest(self.request.run_dir, self.request.checkpoint, values["queries"], values["judge"], limit)

    @on(Input.Changed)
    def show_command(self) -> None:
        command = self.read().command()
        self.query_one("#eval-command", Static).update(Text(command))
        self.app.copy_to_clipboard(command)

    @on(Input.Submitted)
    def submit(self) -> None:
        self.dismiss(self.read())


class HelpModal(ModalScreen[None]):
    """The keys of the screen it was opened on, read from that screen's live bindings (see screen_keys),
    so that it shows what the keys do there and then; escape or ? closes it."""

    BINDINGS = [Binding("escape,question_mark,enter", "dismiss", "Close")]

    def __init__(self, screen: Screen) -> None:
        super().__init__(classes="dialog-screen")
        name = type(screen).__name__.removesuffix("Screen").removesuffix("Modal") or "this"
        self.title_text = f"Keys of the {name} screen"
        self.sections = screen_keys(screen)

    @property
    def rows(self) -> list[tuple[str, str]]:
        """(keys, what they do) for every row shown."""
        return [(keys, description) for _, rows in self.sections for keys, description, _ in rows]

    def compose(self) -> ComposeResult:
        text = Text()
        for heading, rows in self.sections:
            text.append(f"{heading}\n", style="bold")
            width = max(len(keys) for keys, _, _ in rows)
            what = max(len(description) for _, description, _ in rows)
            for keys, description, tooltip in rows:
                text.append(f"  {keys:<{width}}  ", style="bold")
                text.append(f"{description:<{what}}")
                if tooltip and tooltip != description:
                    text.append(f"  {tooltip}", style="dim")
                text.append("\n")
            text.append("\n")
        text.rstrip()
        with Vertical(classes="dialog wide help"):
            yield Label(self.title_text, classes="dialog-title")
            yield VerticalScroll(
                Static(text if text.plain else Text("no keys here"), classes="dialog-body"), id="help-keys"
            )
            yield Static("escape or ? closes; ctrl+p searches every command", classes="dialog-hint")


def screen_keys(screen: Screen) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The keys that act on `screen` now, from its active bindings (a key a focused field takes for itself
    is the field's): (heading, [(keys, description, tooltip)]) for the screen, then for every screen.
    A focused widget's own keys are listed where it shows them in the footer."""
    here: dict[tuple[int, str], list] = {}
    everywhere: dict[tuple[int, str], list] = {}
    for key, active in screen.active_bindings.items():
        binding, node = active.binding, active.node
        widget_hidden = node is not screen and node is not screen.app and not binding.show
        if not binding.description or binding.system or widget_hidden:
            continue
        rows = everywhere if node is screen.app else here
        row = rows.setdefault((id(node), binding.action), [[], binding.description, binding.tooltip, active.enabled])
        row[0].append(key_name(key))
    sections = []
    for heading, rows in (("This screen", here), ("Every screen", everywhere)):
        if rows:
            shown = [
                (", ".join(keys), description if enabled else f"{description} (not now)", tooltip or "")
                for keys, description, tooltip, enabled in rows.values()
            ]
            sections.append((heading, shown))
    return sections


def key_name(key: str) -> str:
    """A key as a user types it: ctrl+s, f8, ?, alt+↑."""
    return "+".join(format_key(part) for part in key.split("+"))
