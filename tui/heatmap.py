"""The score-matrix heat map: colour carries the value, the selected (or hovered) cell shows its number."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import DataTable, Static

from sami_mlx.inputs.constitution import concrete_strategy, variant_strategy

LOW, HIGH = (30, 40, 120), (230, 140, 20)  # dark blue for low scores, orange for high ones


def colour(t: float) -> str:
    """The scale's colour at t in [0, 1]."""
    r, g, b = (int(lo + (hi - lo) * t) for lo, hi in zip(LOW, HIGH))
    return f"rgb({r},{g},{b})"


def signs(label: str) -> Text:
    """A variant label ("+-") with a green + and a red − per principle (any other label as it is)."""
    if set(label) - {"+", "-"}:
        return Text(label, style="bold")
    out = Text()
    for c in label:
        out.append("+" if c == "+" else "−", style="bold green" if c == "+" else "bold red")
    return out


def variant_labels(n: int, config: dict, principles: int) -> list[str]:
    """The labels of a score matrix's rows and columns when its event does not carry them (runs logged
    before StepCompleted had `variants`): every variant in order under 'grid' (or 'auto' up to 8), else v1..vN."""
    try:
        strategy = concrete_strategy(variant_strategy(str(config.get("variants", "auto"))), principles)
    except ValueError:
        strategy = None
    if strategy == "grid" and principles and 2**principles == n:
        return ["".join("+" if s else "-" for s in p) for p in itertools.product((True, False), repeat=principles)]
    return [f"v{j + 1}" for j in range(n)]


class HeatTable(DataTable):
    """The matrix's cells; tells its heat map which cell the mouse is over."""

    class Hovered(Message):
        def __init__(self, coordinate: Coordinate) -> None:
            super().__init__()
            self.coordinate = coordinate

    def watch_hover_coordinate(self, old: Coordinate, value: Coordinate) -> None:
        super().watch_hover_coordinate(old, value)
        if self.is_mounted and self.row_count and self._show_hover_cursor:
            self.post_message(self.Hovered(value))


class ScoreHeatmap(Vertical):
    """The latest N×N score matrix S[i, j] = mean log π(y_j | c_i, x) of one query group: row i is the
    prompt with variant i's constitution, column j the response sampled under variant j."""

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self.scores: list[list[float]] = []
        self.labels: list[str] = []
        self.range = (0.0, 1.0)
        self._drawn: tuple | None = None  # (scores, labels, group) on screen

    def compose(self) -> ComposeResult:
        yield Static("", classes="heat-title")
        yield Static("", classes="heat-query")
        yield HeatTable(cursor_type="cell", cell_padding=0, show_cursor=True, zebra_stripes=False)
        yield Static("", classes="heat-value")

    def show(self, scores: Sequence[Sequence[float]] | None, labels: Sequence[str] = (), group: str = "") -> None:
        """Draw a matrix (only when it changed), labelled by its variants' signs; `group` says which
        query group it is (one line, cut with an ellipsis where it does not fit)."""
        matrix = [[float(v) for v in row] for row in scores or []]
        names = list(labels) if len(labels) == len(matrix) else [f"v{j + 1}" for j in range(len(matrix))]
        if (matrix, names, group) == self._drawn:
            return
        self._drawn = (matrix, names, group)
        line = " ".join(group.split())  # a query's newlines would break the one-line caption
        self.query_one(".heat-query", Static).update(Text(line, style="dim", no_wrap=True, overflow="ellipsis"))
        self.scores, self.labels = matrix, names
        scores, labels = matrix, names
        table = self.query_one(HeatTable)
        cursor = table.cursor_coordinate
        table.clear(columns=True)
        title = self.query_one(".heat-title", Static)
        if not scores:
            title.update(Text("score matrix: waiting for the first step", style="dim"))
            self.query_one(".heat-value", Static).update("")
            return
        flat = [v for row in scores for v in row if math.isfinite(v)]
        lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
        self.range = (lo, hi)
        width = max(2, *(len(label) for label in labels)) + 1  # a gap between the columns' labels
        for label in labels:  # columns: responses y_j, labelled by the variant they were sampled under
            table.add_column(signs(label), width=width)
        for i, row in enumerate(scores):
            cells = [self._cell(v, i == j, width) for j, v in enumerate(row)]
            table.add_row(*cells, label=signs(labels[i]))
        title.update(self._title())
        n = len(scores)
        table.cursor_coordinate = cursor if cursor.row < n and cursor.column < n else Coordinate(0, 0)
        self.describe(table.cursor_coordinate)

    def _cell(self, value: float, diagonal: bool, width: int) -> Text:
        lo, hi = self.range
        t = 0.5 if hi <= lo or not math.isfinite(value) else (value - lo) / (hi - lo)
        mark = "•" if diagonal else " "  # a response scored under its own prompt
        return Text(mark.center(width), style=f"bold #ffffff on {colour(t)}")

    def _title(self) -> Text:
        lo, hi = self.range
        out = Text("S[c_i, y_j]  ", style="bold", no_wrap=True, overflow="ellipsis")
        out.append(f"{lo:.2f} ")
        for k in range(6):
            out.append(" ", style=f"on {colour(k / 5)}")
        out.append(f" {hi:.2f}")
        return out

    def describe(self, at: Coordinate) -> None:
        """The exact score of one cell, under the table."""
        i, j = at.row, at.column
        box = self.query_one(".heat-value", Static)
        if not (0 <= i < len(self.scores) and 0 <= j < len(self.scores[i])):
            box.update("")
            return
        out = Text()
        out.append("c ").append_text(signs(self.labels[i])).append(" × y ").append_text(signs(self.labels[j]))
        out.append(f"  {self.scores[i][j]:.3f}", style="bold")
        out.append("  (own response)" if i == j else "", style="dim")
        box.update(out)

    @on(DataTable.CellHighlighted)
    def _selected(self, event: DataTable.CellHighlighted) -> None:
        event.stop()
        self.describe(event.coordinate)

    @on(HeatTable.Hovered)
    def _hovered(self, event: HeatTable.Hovered) -> None:
        self.describe(event.coordinate)
