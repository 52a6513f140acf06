"""Screen 1: edit a constitution in place, validated as you type, with a preview of its variants."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.dom import DOMNode
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Header, Input, Label, Static

from sami_mlx.errors import SamiError
from sami_mlx.fileio import EditableFile, read_structured
from sami_mlx.inputs.constitution import (
    Constitution,
    Problem,
    constitution_from_dict,
    constitution_problems,
    load_constitution,
    num_variants,
    parse_variants,
    principle_label,
    read_constitution_file,
    sample_variants,
    save_constitution,
    variant_strategy,
)
from tui.messages import ConstitutionOpened, ConstitutionSaved, ErrorRaised
from tui.modals import ChoiceModal, PathModal
from tui.state.runlog import short_path
from tui.state.session import Session
from tui.state.threads import in_fresh_thread
from tui.widgets import KeysFooter, NavTabs, PrincipleCard

PREVIEW_LIMIT = 8


def principle_notes(problems: list[Problem], count: int) -> list[list[str]]:
    """What to fix in each of `count` principles, shown under it (the engine's constitution_problems)."""
    out: list[list[str]] = [[] for _ in range(count)]
    for problem in problems:
        for i, note in problem.notes.items():
            out[i].append(note)
    return out


class ConstitutionScreen(Screen):
    """The principles as cards (name, + wording, − wording); save writes the file atomically."""

    AUTO_FOCUS = ".principle-name"

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", tooltip="Save the constitution (atomically)"),
        Binding("f4", "save_as", "Save as"),
        Binding("ctrl+o", "open", "Open", tooltip="Open a constitution file"),
        Binding("ctrl+n", "add", "Add", tooltip="Add a principle after the focused one"),
        # Not ctrl+d: in a text field that deletes a character, and the fields are the field's own.
        Binding("f8", "delete", "Delete", tooltip="Delete the focused principle (ctrl+z brings it back)"),
        Binding("ctrl+z", "undo", "Undo", tooltip="Bring back the last deleted principle where it was"),
        Binding("alt+up", "move(-1)", "Up", tooltip="Move the focused principle up"),
        Binding("alt+down", "move(1)", "Down", tooltip="Move the focused principle down"),
        Binding("ctrl+r", "reroll", "Preview", tooltip="Draw another set of variants for the preview"),
        Binding("ctrl+g", "draft", "Draft", tooltip="Draft principles with a model (the principle writer)"),
    ]

    class DraftStatus(Message, bubble=False):
        """What the principle writer is doing."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Drafted(Message, bubble=False):
        """The writer's principles (`constitution`), or the `error` that stopped it."""

        def __init__(self, constitution: Constitution | None, error: BaseException | None = None) -> None:
            super().__init__()
            self.constitution, self.error = constitution, error

    def __init__(self, session: Session) -> None:
        super().__init__(id="constitution-screen")
        self.session = session
        self.path: Path | None = None
        self.read_only: Path | None = None  # the run's own constitution, shown here: saved only elsewhere
        self._run_tried: str | None = None
        self.saved: dict | None = None  # the document as last loaded or saved
        self.source: EditableFile | None = None  # the file as read, for saving to update in place
        self.preview_seed = 0
        self._loading = False
        self.deleted: list[tuple[int, dict[str, str], int | None]] = []  # (position, values, origin), for undo

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavTabs("constitution")
        with Horizontal(id="constitution-body"):
            with Vertical(id="principles-pane"):
                with Horizontal(id="constitution-name-row"):
                    yield Label("Constitution", classes="field-label")
                    yield Input(placeholder="constitution name", id="constitution-name", compact=True)
                yield VerticalScroll(id="principles")
                yield Static("", id="constitution-status")
            with Vertical(id="preview-pane"):
                with Horizontal(id="variants-row"):
                    yield Label("Variants", classes="field-label")
                    yield Input(
                        "auto", placeholder="auto, paper, grid or a number", id="preview-variants", compact=True
                    )
                yield VerticalScroll(Static("", id="preview"), id="preview-scroll")
        yield KeysFooter()

    async def on_mount(self) -> None:
        path = self.session.constitution_path
        if not path and await self.open_run_constitution():
            return
        if path and Path(path).exists():
            try:
                await self.load(Path(path))
                return
            except SamiError as e:
                self.post_message(ErrorRaised(e, "Could not open the constitution"))
        await self.show_document(
            {"name": "my-constitution", "principles": [{"name": "", "positive": "", "negative": ""}]},
            Path(path) if path else None,
        )

    async def on_screen_resume(self) -> None:
        if self.path is None and not self.dirty:  # nothing typed yet: a run opened since brings its own
            await self.open_run_constitution()

    async def open_run_constitution(self) -> bool:
        """Show the constitution the app's run trained with (its config.yaml's), read-only: saving asks
        for another file, so the run's record never changes. False when there is no run or it has none."""
        from sami_mlx.config_file import load_run_config

        if not self.session.run_dir or self._run_tried == self.session.run_dir:
            return False
        self._run_tried = self.session.run_dir  # once per run: a broken one reports once
        try:
            name = load_run_config(self.session.run_dir, flag="").constitution
            if not name:
                return False
            path = Path(name).expanduser()
            await self.load(path)
        except SamiError as e:
            self.post_message(ErrorRaised(e, "Could not open the run's constitution"))
            return False
        self.read_only = path
        self.validate()
        return True

    def current(self) -> Constitution:
        """The constitution in the editor (validated), or the file the app was given while the editor
        has not been opened yet; raises SamiError naming what to fix."""
        if self.is_mounted:
            return self.constitution()
        if self.session.constitution_path:
            return load_constitution(self.session.constitution_path)
        raise SamiError("no constitution yet; write one on the Constitution screen (F1)")

    # ---- the document ---------------------------------------------------------------------

    def document(self) -> dict:
        """The constitution as the editor holds it now (unvalidated)."""
        return {
            "name": self.query_one("#constitution-name", Input).value,
            "principles": [card.values() for card in self.query(PrincipleCard)],
        }

    @property
    def dirty(self) -> bool:
        return self.is_mounted and self.document() != self.saved

    def constitution(self) -> Constitution:
        """The document validated by the engine; raises SamiError naming what to fix."""
        return constitution_from_dict(self.document(), short_path(self.path) if self.path else "constitution")

    async def load(self, path: Path) -> None:
        """Open a file; one with mistakes the editor can show (an empty wording, a duplicate) opens too."""
        doc: dict | None
        try:
            doc = load_constitution(path).to_dict()
        except SamiError as e:
            doc = editable(read_structured(path, "constitution file"))
            if doc is None:
                raise
            self.notify(str(e), title="Opened with errors to fix", severity="warning", timeout=8)
        try:
            self.source = read_constitution_file(path)
        except SamiError:  # read by the loader but not by ruamel.yaml: saved afresh, without its comments
            self.source = None
        entries = self.source.data.get("principles") if self.source and isinstance(self.source.data, dict) else None
        same = isinstance(entries, list) and len(entries) == len(doc["principles"])
        await self.show_document(doc, path, origins=list(range(len(doc["principles"]))) if same else None)

    async def show_document(
        self, doc: dict, path: Path | None, saved: bool = True, origins: list[int | None] | None = None
    ) -> None:
        """Replace the editor's content; what is shown counts as saved unless `saved` is False. `origins`
        are the principles' indices in the file (PrincipleCard.origin); missing ones are new."""
        self._loading = True
        self.path, self.read_only = path, None
        self.post_message(ConstitutionOpened(path))
        self.query_one("#constitution-name", Input).value = doc.get("name", "")
        box = self.query_one("#principles", VerticalScroll)
        await box.remove_children()
        origins = list(origins or [])
        origins += [None] * (len(doc["principles"]) - len(origins))
        await box.mount_all(
            [PrincipleCard(p["name"], p["positive"], p["negative"], o) for p, o in zip(doc["principles"], origins)]
        )
        self._loading = False
        self.deleted.clear()
        self.refresh_bindings()
        if saved:
            self.saved = self.document()
        self.validate()
        cards = box.query(PrincipleCard)
        if cards:
            cards.first().focus_field("name")

    # ---- validation and preview -----------------------------------------------------------

    @on(Input.Changed)
    def edited(self, event: Input.Changed) -> None:
        if event.input.id == "preview-variants":
            self.update_preview()
        elif not self._loading:
            self.validate()

    def validate(self) -> None:
        cards = list(self.query(PrincipleCard))
        problems = constitution_problems(self.document(), short_path(self.path) if self.path else "constitution")
        for n, (card, notes) in enumerate(zip(cards, principle_notes(problems, len(cards))), 1):
            card.show_state(n, notes)
        status = self.query_one("#constitution-status", Static)
        where = short_path(self.path) if self.path else "unsaved file"
        mark = " · modified" if self.dirty else ""
        if self.read_only:
            mark += " · the run's: read-only, saved elsewhere"
        if problems:
            text = Text.assemble(("✗ ", "bold red"), problems[0].message, (f"   [{where}{mark}]", "dim"))
        else:
            text = Text.assemble(
                ("✓ ", "bold green"), f"{len(cards)} principles, valid", (f"   [{where}{mark}]", "dim")
            )
        if text != status.content:
            status.update(text)
            status.set_class(text.plain.startswith("✗"), "invalid")
        self.sub_title = f"{where}{mark}"
        self.update_preview()

    def update_preview(self) -> None:
        preview = self.query_one("#preview", Static)
        text = self.preview_text()
        if text != preview.content:
            preview.update(text)

    def preview_text(self) -> Text:
        """The variants one query would get under the chosen strategy, rendered."""
        try:
            c = self.constitution()
        except SamiError:
            return Text("fix the errors on the left to preview the variants", style="dim")
        try:
            strategy = variant_strategy(str(parse_variants(self.query_one("#preview-variants", Input).value.strip())))
            n = num_variants(strategy, len(c.principles))
        except SamiError as e:
            return Text(str(e), style="red")
        variants = sample_variants(strategy, len(c.principles), random.Random(self.preview_seed))
        text = Text(f"{n} variants per query; one query's draw (ctrl+r draws again):\n\n", style="dim")
        for v in variants[:PREVIEW_LIMIT]:
            for sign in v.label:
                text.append(sign if sign == "+" else "−", style="bold green" if sign == "+" else "bold red")
            text.append("  all positive\n" if v.is_positive else "\n", style="dim")
            text.append(c.render(v) + "\n\n")
        if len(variants) > PREVIEW_LIMIT:
            text.append(f"… and {len(variants) - PREVIEW_LIMIT} more", style="dim")
        return text

    # ---- actions --------------------------------------------------------------------------

    def focused_card(self) -> PrincipleCard | None:
        node: DOMNode | None = self.focused
        while node is not None and not isinstance(node, PrincipleCard):
            node = node.parent
        return node

    async def action_add(self) -> None:
        box = self.query_one("#principles", VerticalScroll)
        card, current = PrincipleCard(), self.focused_card()
        await box.mount(card, after=current) if current else await box.mount(card)
        card.focus_field("name")
        card.scroll_visible()
        self.validate()

    async def action_delete(self) -> None:
        card = self.focused_card()
        if card is None:
            self.notify("focus a principle to delete it", severity="warning")
            return
        cards = list(self.query(PrincipleCard))
        i = cards.index(card)
        values = card.values()
        self.deleted.append((i, values, card.origin))
        await card.remove()
        rest = cards[:i] + cards[i + 1 :]
        if rest:
            rest[min(i, len(rest) - 1)].focus_field("name")
        self.validate()
        self.refresh_bindings()
        label = principle_label(i, values["name"].strip())
        self.notify(f"deleted {label}; ctrl+z brings it back", title="Principle deleted")

    async def action_undo(self) -> None:
        """Bring back the last deleted principle, at its place and with its file entry (comments kept)."""
        if not self.deleted:
            return
        i, values, origin = self.deleted.pop()
        box = self.query_one("#principles", VerticalScroll)
        cards = list(self.query(PrincipleCard))
        card = PrincipleCard(values["name"], values["positive"], values["negative"], origin)
        await box.mount(card, before=cards[i]) if i < len(cards) else await box.mount(card)
        card.focus_field("name")
        card.scroll_visible()
        self.validate()
        self.refresh_bindings()
        self.notify(f"restored {principle_label(i, values['name'].strip())}")

    def action_move(self, offset: int) -> None:
        card = self.focused_card()
        if card is None:
            return
        cards = list(self.query(PrincipleCard))
        i = cards.index(card)
        j = i + offset
        if not 0 <= j < len(cards):
            return
        box = self.query_one("#principles", VerticalScroll)
        if offset < 0:
            box.move_child(card, before=cards[j])
        else:
            box.move_child(card, after=cards[j])
        card.scroll_visible()
        self.validate()

    def action_reroll(self) -> None:
        self.preview_seed += 1
        self.update_preview()

    def action_save(self) -> bool:
        """Save to the current file (asking for one the first time, or when it is a run's); True when saved."""
        if self.path is None or self.read_only:
            self.action_save_as()
            return False
        return self.save_to(self.path)

    def save_to(self, path: Path) -> bool:
        cards = list(self.query(PrincipleCard))
        if self.read_only and path.expanduser().resolve() == self.read_only.resolve():
            error = SamiError(
                f"{short_path(path)} is the run's own constitution (what it trained with); save elsewhere"
            )
            self.post_message(ErrorRaised(error, "Not saved"))
            return False
        try:
            source = save_constitution(self.constitution(), path, self.source, [c.origin for c in cards])
        except SamiError as e:
            self.report(e, "Not saved")
            return False
        except OSError as e:
            self.report(SamiError(f"{short_path(path)}: cannot write ({e.strerror})"), "Not saved")
            return False
        self.path, self.read_only = path, None
        self.post_message(ConstitutionSaved(path))
        self.saved = self.document()
        if source is not None:  # the file now holds the cards in their order; a deleted one is gone
            self.source = source
            for i, card in enumerate(cards):
                card.origin = i
            self.deleted = [(i, values, None) for i, values, _ in self.deleted]
        self.validate()
        self.notify(f"saved {short_path(path)}")
        return True

    def action_save_as(self) -> None:
        def chosen(value: str | None) -> None:
            if value:
                self.save_to(Path(value).expanduser())

        default = str(short_path(self.path)) if self.path and not self.read_only else "constitution.yaml"
        self.app.push_screen(PathModal("Save constitution as (.yaml or .json)", default), chosen)

    def action_open(self) -> None:
        async def chosen(value: str | None) -> None:
            if not value:
                return
            try:
                await self.load(Path(value).expanduser())
            except SamiError as e:
                self.report(e, "Could not open the constitution")

        def ask_path() -> None:
            default = str(short_path(self.path)) if self.path else ""
            self.app.push_screen(PathModal("Open constitution (.yaml or .json)", default), chosen)

        if self.dirty:
            where = short_path(self.path) if self.path else "this constitution"
            self.save_or_discard_then(f"Save the changes to {where} first?", ask_path)
        else:
            ask_path()

    def save_or_discard_then(self, question: str, then: Callable[[], object]) -> None:
        """Ask `question` about the unsaved changes: `then()` once they are saved or discarded (not when
        the user cancels, nor when saving fails)."""

        def answered(choice: str | None) -> None:
            if choice == "discard" or (choice == "save" and self.action_save()):
                then()

        choices = [("save", "Save"), ("discard", "Discard"), ("cancel", "Cancel")]
        self.app.push_screen(ChoiceModal("Unsaved changes", question, choices), answered)

    def report(self, error: BaseException, title: str) -> None:
        self.post_message(ErrorRaised(error, title))

    # ---- the principle writer -------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "draft":
            return writer_available()
        if action == "undo":
            return bool(self.deleted)  # shown only when there is a deletion to undo
        return True

    def action_draft(self) -> None:
        from tui.modals import DraftModal

        def chosen(request: dict | None) -> None:
            if not request:
                return
            if not request["writer"]:
                self.report(SamiError("give the writer model: an instruct model's hub id or directory"), "Cannot draft")
                return
            self.notify(f"drafting {request['principles']} principles with {request['writer']}…")
            self.draft(
                request["writer"],
                request["task"],
                request["principles"],
                self.query_one("#constitution-name", Input).value.strip() or "constitution",
            )

        self.app.push_screen(DraftModal(self.session.model), chosen)

    @work(thread=True, exclusive=True, exit_on_error=False, group="draft")
    def draft(self, writer: str, task: str, k: int, name: str) -> None:
        """Load the writer and let it draft (it retries malformed answers itself)."""
        from sami_mlx.model import load_model
        from sami_mlx.writer import draft_constitution

        def attempt(n: int, answer: str, error: str | None) -> None:
            self.post_message(self.DraftStatus(f"answer {n}: {'read' if error is None else error}"))

        def write() -> Constitution:
            self.post_message(self.DraftStatus(f"loading {writer}…"))
            model, tokenizer, _ = load_model(writer)
            self.post_message(self.DraftStatus("the writer is drafting…"))
            return draft_constitution(model, tokenizer, task, k, name=name, on_attempt=attempt)

        try:
            constitution = in_fresh_thread(write)
        except Exception as e:  # a bad model or an unreadable answer: shown, never a crash
            self.post_message(self.Drafted(None, e))
        else:
            self.post_message(self.Drafted(constitution))

    @on(DraftStatus)
    def draft_status(self, message: DraftStatus) -> None:
        self.notify(message.text, title="Principle writer", timeout=4)

    @on(Drafted)
    def drafted(self, message: Drafted) -> None:
        if message.error is not None:
            self.report(message.error, "The writer could not draft principles")
            return
        assert message.constitution is not None  # Drafted carries the principles or the error
        drafted = [
            {"name": p.name, "positive": p.positive, "negative": p.negative} for p in message.constitution.principles
        ]
        cards = [c for c in self.query(PrincipleCard) if any(v.strip() for v in c.values().values())]
        current = [c.values() for c in cards]

        async def apply(choice: str | None = "replace") -> None:
            if choice not in ("replace", "append"):
                return
            doc = self.document()
            doc["principles"] = drafted if choice == "replace" else current + drafted
            origins = [c.origin for c in cards] if choice == "append" else None
            await self.show_document(doc, self.path, saved=False, origins=origins)
            self.notify(f"{len(drafted)} drafted principles added; review them and save (ctrl+s)")

        if current:
            self.app.push_screen(
                ChoiceModal(
                    "Drafted principles",
                    f"The writer drafted {len(drafted)} principles. Replace the {len(current)} you have, or add them?",
                    [("replace", "Replace"), ("append", "Add"), ("cancel", "Cancel")],
                ),
                apply,
            )
        else:
            self.call_later(apply)


def editable(data: object) -> dict | None:
    """A parsed constitution file as the editor's document, or None when it is not one at all."""
    if not isinstance(data, dict) or not isinstance(data.get("principles"), list):
        return None
    if not all(isinstance(p, dict) for p in data["principles"]):
        return None
    return {
        "name": _text(data.get("name", "constitution")),
        "principles": [{k: _text(p.get(k)) for k in ("name", "positive", "negative")} for p in data["principles"]]
        or [{"name": "", "positive": "", "negative": ""}],
    }


def _text(value: object) -> str:
    return "" if value is None else str(value)


def writer_available() -> bool:
    """The principle writer (sami_mlx.writer) ships with this install."""
    import importlib.util

    return importlib.util.find_spec("sami_mlx.writer") is not None
