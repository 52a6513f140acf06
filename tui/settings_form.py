"""The Run screen's settings form: a widget per TrainConfig field, the main ones first and the rest
under a collapsible "more settings"; it loads from and saves to a YAML config file."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widget import Widget
from textual.widgets import Checkbox, Collapsible, Input, Label, Select, Static

from sami_mlx.config import FIELDS, TrainConfig
from sami_mlx.config_file import PATH_SETTINGS, config_from_file
from sami_mlx.errors import SamiError
from sami_mlx.fileio import atomic_write_text
from tui.messages import ErrorRaised
from tui.state.run_settings import (
    BY_FIELD,
    DEFAULTS,
    MAIN,
    MORE,
    SETTINGS,
    Setting,
    check_choices,
    config_yaml,
    form_values,
    setting_text,
)
from tui.state.runlog import short_path

_FLAG = re.compile(r"--([a-z0-9-]+)")


# The settings that name a file or folder: a long path's end is what tells two apart.
PATH_FIELDS = {*PATH_SETTINGS, "out"}


class PathInput(Input):
    """A text field for a path that, while not being edited, shows the path's end (a narrow field
    otherwise shows the same first characters for every path under one folder)."""

    def on_mount(self) -> None:
        self.call_after_refresh(self.show_tail)

    def on_resize(self) -> None:
        self.show_tail()

    def _on_blur(self, event: events.Blur) -> None:
        super()._on_blur(event)
        self.call_after_refresh(self.show_tail)

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        if event.input is self:
            self.call_after_refresh(self.show_tail)

    def show_tail(self) -> None:
        """Scroll to the end of the path unless the user is editing it."""
        if self.has_focus or not self.is_mounted:
            return
        self.cursor_position = len(self.value)  # where a click or a key resumes editing: the end shown
        self.scroll_to(x=max(0, cell_len(self.value) - self.content_size.width), animate=False, immediate=True)


def setting_widget(s: Setting) -> Widget:
    """A checkbox for a switch, a choice list for a fixed set of values, else a text field."""
    wid, tip = f"set-{s.field}", s.help
    widget: Widget
    if s.kind == "bool" and not s.switch:
        widget = Checkbox(s.label, bool(s.default), id=wid, classes="setting", compact=True)
    elif s.choices:
        options = [(c, c) for c in s.choices]
        value = setting_text(s, s.default) if s.switch else s.default
        widget = Select(options, value=value, allow_blank=False, id=wid, classes="setting", compact=True)
    else:
        text = setting_text(s, s.default)
        kind = PathInput if s.field in PATH_FIELDS else Input
        widget = kind(text, placeholder=s.placeholder, type=s.input_type, id=wid, classes="setting", compact=True)
    widget.tooltip = tip
    return widget


class SettingsForm(VerticalScroll):
    """Every setting of a run, by TrainConfig field name; `#set-<field>` is each field's widget."""

    file = "sami.yaml"  # where ctrl+s saves and ctrl+l loads, as last chosen

    def compose(self) -> ComposeResult:
        yield from self._rows(MAIN)
        with Collapsible(title="More settings", collapsed=True, id="more-settings"):
            yield from self._rows(MORE)
        yield Static("", id="settings-status")

    def _rows(self, settings: list[Setting]) -> ComposeResult:
        for s in settings:
            if s.kind == "bool" and not s.switch:
                yield setting_widget(s)
                continue
            with Horizontal(classes="setting-row"):
                yield Label(s.label, classes="setting-label").with_tooltip(s.help)
                yield setting_widget(s)

    def widget(self, field: str) -> Widget:
        return self.query_one(f"#set-{field}")

    def typed(self) -> dict[str, str | bool]:
        """What each widget holds, by field name."""
        out: dict[str, str | bool] = {}
        for s in SETTINGS:
            w = self.widget(s.field)
            if isinstance(w, Checkbox):
                out[s.field] = w.value
            elif isinstance(w, Select):
                out[s.field] = str(w.value)
            else:
                out[s.field] = w.value  # type: ignore[attr-defined]
        return out

    def values(self) -> dict[str, Any]:
        """The settings as TrainConfig keyword arguments; raises SamiError naming the field to fix."""
        return form_values(self.typed())

    def config(self, new_run_dir: str) -> TrainConfig:
        """The form as a resolved TrainConfig (a new run directory unless one was typed)."""
        values = self.values()
        values.setdefault("out", new_run_dir)
        return TrainConfig(**values).resolved()

    def show(self, values: Mapping[str, Any]) -> None:
        """Put settings (TrainConfig names) into the form; fields not given keep what they show."""
        check_choices(values, "settings")
        for name, value in values.items():
            if name not in BY_FIELD:
                continue
            s, w = BY_FIELD[name], self.widget(name)
            if isinstance(w, Checkbox):
                w.value = bool(value)
            elif isinstance(w, Select):
                w.value = setting_text(s, value) if s.switch else value
            else:
                w.value = setting_text(s, value)  # type: ignore[attr-defined]

    def flag(self, error: SamiError | None) -> None:
        """Mark the field an error names (by its --flag or label), clear the others."""
        message = str(error) if error else ""
        named = {m.replace("-", "_") for m in _FLAG.findall(message)}
        for s in SETTINGS:
            bad = bool(message) and (s.field in named or message.startswith(f"{s.label}:"))
            self.widget(s.field).set_class(bad, "invalid")

    def show_status(self, text: Text) -> None:
        status = self.query_one("#settings-status", Static)
        if text != status.content:
            status.update(text)

    # ---- files ------------------------------------------------------------------------------

    def load(self, path: str) -> None:
        """Settings from a YAML config (or a shipped recipe): the file's settings over the defaults;
        model, constitution and run directory stay as they are unless the file names them."""
        values = config_from_file(path)
        check_choices(values, path)
        keep = {k: v for k, v in self.typed().items() if k in ("model", "constitution", "out") and k not in values}
        self.show({**DEFAULTS, **values})
        for name, text in keep.items():
            self.widget(name).value = text  # type: ignore[attr-defined]

    def save(self, path: str) -> Path:
        """Write the settings to a YAML config `sami-mlx train -c` accepts; refuses settings it would refuse."""
        values = self.values()
        TrainConfig(**values).resolved()  # what the CLI would refuse is refused here, with its message
        target = Path(path).expanduser()
        if target.suffix.lower() not in (".yaml", ".yml"):
            raise SamiError(f"{path}: save settings as a .yaml file")
        atomic_write_text(target, config_yaml(absolute_paths({k: v for k, v in values.items() if k in FIELDS})))
        return target

    def ask_load(self) -> None:
        """Ask for a YAML file and load it; a bad file is reported in the error dialog."""

        def loaded(path: str) -> str:
            self.load(path)
            return f"settings loaded from {path}"

        self._ask("Load settings from a YAML file", loaded, "Cannot load the settings")

    def ask_save(self) -> None:
        """Ask where, then save; settings the CLI would refuse are reported instead."""

        def saved(path: str) -> str:
            where = short_path(self.save(path))
            return f"settings saved to {where}; `sami-mlx train -c {where}` runs them"

        self._ask("Save settings to a YAML file", saved, "Cannot save the settings")

    def _ask(self, title: str, act: Callable[[str], str], failure: str) -> None:
        """Ask for a path, `act` on it (returning what to tell the user), and remember it as the form's file;
        a SamiError or OSError goes to the error dialog under `failure`."""
        from tui.modals import PathModal

        def chosen(path: str | None) -> None:
            if path is None:
                return
            try:
                done = act(path)
            except (SamiError, OSError) as e:
                error = e if isinstance(e, SamiError) else SamiError(f"{path}: {e.strerror or e}")
                self.post_message(ErrorRaised(error, failure))
                return
            self.file = path
            self.notify(done)

        self.app.push_screen(PathModal(title, self.file), chosen)


def absolute_paths(values: dict) -> dict:
    """`values` with each relative path that exists from the working directory made absolute: a config file
    finds relative paths next to itself, so a saved file names the files the form meant wherever it lies."""
    out = dict(values)
    for key in PATH_SETTINGS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            path = Path(value).expanduser()
            if path.exists():
                out[key] = str(path.absolute())
    return out
