"""Widgets the screens share: a principle card, metric plots, sample groups (the heat map: tui/heatmap.py)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input, Label, Sparkline, Static, Tab, Tabs
from textual.widgets._footer import FooterKey

from tui.state.runlog import printable

_card_ids = itertools.count(1)


class PrincipleCard(Vertical):
    """One principle edited in place: its name, positive wording and negative wording. `origin` is its
    index in the file it was opened from (None for a new one), so that saving updates that entry in
    place and keeps its comments and unknown keys."""

    def __init__(self, name: str = "", positive: str = "", negative: str = "", origin: int | None = None) -> None:
        super().__init__(id=f"principle-{next(_card_ids)}", classes="principle")
        self._initial = (name, positive, negative)
        self.origin = origin
        self._shown: tuple = (None, None)  # (number, problems) on screen: redraw only on change

    def compose(self) -> ComposeResult:
        name, positive, negative = self._initial
        with Horizontal(classes="principle-head"):
            yield Label("", classes="principle-number")
            yield Input(name, placeholder="name", classes="principle-name", compact=True)
        with Horizontal(classes="wording"):
            yield Label("+", classes="sign positive")
            yield Input(positive, placeholder="positive wording", classes="principle-positive", compact=True)
        with Horizontal(classes="wording"):
            yield Label("−", classes="sign negative")
            yield Input(
                negative, placeholder="negative wording (the antithesis)", classes="principle-negative", compact=True
            )
        yield Static("", classes="principle-problems")

    def values(self) -> dict[str, str]:
        """The principle as a constitution file has it."""
        if not self.is_mounted or not self.children:
            name, positive, negative = self._initial
        else:
            name, positive, negative = (
                self.query_one(f".principle-{k}", Input).value for k in ("name", "positive", "negative")
            )
        return {"name": name, "positive": positive, "negative": negative}

    def show_state(self, n: int, problems: Sequence[str]) -> None:
        """Its number, and inline validation: the card turns red and lists what to fix."""
        number, shown = self._shown
        if n != number:
            self.query_one(".principle-number", Label).update(f"{n}.")
        if list(problems) != shown:
            self.set_class(bool(problems), "invalid")
            box = self.query_one(".principle-problems", Static)
            box.update(Text("; ".join(problems)))
            box.display = bool(problems)
        self._shown = (n, list(problems))

    def focus_field(self, field: str = "name") -> None:
        self.query_one(f".principle-{field}", Input).focus()


class MetricPlot(Vertical):
    """A metric per step as a sparkline, with its last, min and max, and per iteration below."""

    def __init__(self, title: str, id: str | None = None) -> None:
        super().__init__(id=id, classes="plot")
        self.title = title

    def compose(self) -> ComposeResult:
        yield Static(self.title, classes="plot-title")
        yield Sparkline([], classes="per-step")
        yield Static("", classes="plot-iterations")

    def show(self, per_step: Sequence[float], per_iteration: Sequence[float]) -> None:
        self.query_one(Sparkline).data = list(per_step)
        title = Text(self.title, style="bold", no_wrap=True, overflow="ellipsis")
        if per_step:
            title.append(f"  {per_step[-1]:.4f}")
            title.append(
                f"   min {min(per_step):.3f}  max {max(per_step):.3f}  ·  "
                f"{len(per_step)} step{'' if len(per_step) == 1 else 's'}",
                style="dim",
            )
        else:
            title.append("  no steps yet", style="dim")
        self.query_one(".plot-title", Static).update(title)
        its = "  ".join(f"it{n} {v:.4f}" for n, v in enumerate(per_iteration, start=1))
        self.query_one(".plot-iterations", Static).update(
            Text(f"per iteration: {its}" if its else "", no_wrap=True, overflow="ellipsis")
        )


def samples_text(groups: Sequence[dict], principles: Sequence[str] = (), limit: int = 30) -> Text:
    """Sample groups: each query with its responses, labelled by variant (+/− per principle)."""
    out = Text()
    if principles:
        out.append("variant signs follow the principles: " + ", ".join(principles) + "\n\n", style="dim")
    if not groups:
        out.append("no samples yet", style="dim")
    for g in list(groups)[:limit]:
        dropped = g.get("kept") is False
        out.append("Q: ", style="bold")
        out.append(printable(str(g.get("query", ""))), style="bold")
        if dropped:
            out.append("  (dropped: degenerate group)", style="dim italic")
        out.append("\n")
        for label, response in zip(g.get("variants", []), g.get("responses", [])):
            out.append("  ")
            for sign in label:
                out.append(sign if sign == "+" else "−", style="green" if sign == "+" else "red")
            out.append("  " + printable(str(response)).replace("\n", "⏎ ") + "\n", style="dim" if dropped else "")
        out.append("\n")
    if len(groups) > limit:
        out.append(f"… and {len(groups) - limit} more groups", style="dim")
    return out


class ChatBubble(Static):
    """One chat message in the transcript."""

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role, self.text = role, text

    def on_mount(self) -> None:
        self.show(self.text)

    def show(self, text: str, done: bool = True) -> None:
        self.text = text
        body = Text(printable(text) or ("…" if not done else ""))
        if not done:
            body.append(" ▌", style="dim")
        self.update(body)


class NavTabs(Tabs, can_focus=False):
    """The three screens as tabs (click, or F1-F3); the active one names the screen shown."""

    SCREENS = (("constitution", "F1 Constitution"), ("run", "F2 Run"), ("chat", "F3 Chat"))

    def __init__(self, active: str) -> None:
        super().__init__(
            *[Tab(label, id=f"tab-{mode}") for mode, label in self.SCREENS], active=f"tab-{active}", classes="nav"
        )
        self.mode = active

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        event.stop()
        mode = str(event.tab.id).removeprefix("tab-")
        if mode != self.mode:
            self.active = f"tab-{self.mode}"  # this screen stays this tab; the app switches screens
            self.app.switch_mode(mode)


class KeysFooter(Footer):
    """The footer with the screen switches (F1/F2/F3) first, so that a narrow terminal, where the
    footer drops whatever does not fit at its right end, cuts a screen's own keys rather than the
    ways to the other screens (`?` and the palette list every key)."""

    def __init__(self) -> None:
        super().__init__(compact=True)

    def compose(self) -> ComposeResult:
        keys = list(super().compose())  # no binding has a group, so compose only yields keys

        def switches_screen(widget: object) -> bool:
            return isinstance(widget, FooterKey) and "switch_mode(" in widget.action

        yield from (k for k in keys if switches_screen(k))
        yield from (k for k in keys if not switches_screen(k))
