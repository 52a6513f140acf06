"""SVG snapshots of each screen (pytest-textual-snapshot); refresh with --snapshot-update.

Deterministic by construction: fixed terminal size, relative paths (each test runs in its own
folder), fixed numbers in the past run, no clock, no blinking cursors, and no scrollbar thumbs.
"""

import json
import time
from pathlib import Path

import pytest
import pytest_textual_snapshot
from helpers import write_demo_result
from textual.widgets import Input

import tui.app
from tui.app import SamiApp as _SamiApp

SIZE = (150, 45)
# The small terminals every screen must work at: nothing cut off that cannot be scrolled to, no labels
# run together, and the footer still showing F1/F2/F3.
SMALL = [pytest.param((80, 24), id="80x24"), pytest.param((100, 30), id="100x30")]


class SamiApp(_SamiApp):
    """The app as pictured: scrollbars keep their gutter but draw no thumb. A thumb repaints on a
    timer of its own after a scroll, so on a busy machine a picture could catch it one frame behind
    the content it belongs to (CI failed on it twice); what the thumb shows is the scroll offset,
    which `steady` waits for instead."""

    CSS_PATH = str(Path(tui.app.__file__).with_name("sami.tcss"))  # a subclass's own would be tests/
    CSS = "* { scrollbar-visibility: hidden; }"


class _SnapshotsFolder(pytest_textual_snapshot.SVGImageExtension):
    """Keep the SVGs in tests/snapshots/<test file>/ rather than syrupy's __snapshots__."""

    @classmethod
    def dirname(cls, *, test_location) -> str:
        return str(Path(test_location.filepath).parent / "snapshots" / test_location.basename)


@pytest.fixture(autouse=True)
def snapshots_folder(monkeypatch):
    monkeypatch.setattr(pytest_textual_snapshot, "SVGImageExtension", _SnapshotsFolder)


@pytest.fixture
def workdir(tmp_path, monkeypatch, constitution_file, past_run):
    monkeypatch.chdir(tmp_path)
    past_run(tmp_path / "runs", "demo")
    return tmp_path


async def steady(pilot, seconds: float = 60) -> None:
    """No blinking cursor in a screenshot, and the screen settled: wait until two frames in a row
    agree, both in what they show and in every widget's scroll offset (a busy machine can take the
    picture between a layout change and its repaint). Fails, naming what still changed, if the screen
    has not settled within `seconds`."""
    await pilot.pause()
    for box in pilot.app.screen.query(Input):
        box.cursor_blink = False
    deadline = time.monotonic() + seconds
    previous = last = None
    while time.monotonic() < deadline:
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()
        frame = (pilot.app.export_screenshot(simplify=True), scroll_offsets(pilot.app))
        if frame == previous:
            return
        last, previous = previous, frame
    assert previous is not None and last is not None
    changed = [b for a, b in zip(last[0].splitlines(), previous[0].splitlines()) if a != b][:3]
    raise AssertionError(f"the screen still changed after {seconds} s: {changed or (last[1], previous[1])}")


def scroll_offsets(app) -> list[tuple[float, float]]:
    """Every widget's scroll offset on the screen, in DOM order."""
    return [(w.scroll_x, w.scroll_y) for w in (app.screen, *app.screen.walk_children())]


def test_constitution_screen(workdir, snap_compare):
    assert snap_compare(SamiApp(constitution="constitution.yaml"), terminal_size=SIZE, run_before=steady)


@pytest.mark.parametrize("size", SMALL)
def test_constitution_screen_small(workdir, snap_compare, size):
    assert snap_compare(SamiApp(constitution="constitution.yaml"), terminal_size=size, run_before=steady)


def test_constitution_screen_inline_errors(workdir, snap_compare):
    async def add_duplicate(pilot):
        await pilot.press("ctrl+n", *"kind")
        await steady(pilot)

    assert snap_compare(SamiApp(constitution="constitution.yaml"), terminal_size=SIZE, run_before=add_duplicate)


def test_unsaved_changes_dialog(workdir, snap_compare):
    async def edit_then_quit(pilot):
        await pilot.press("end", *"-x", "ctrl+q")
        await steady(pilot)

    assert snap_compare(SamiApp(constitution="constitution.yaml"), terminal_size=SIZE, run_before=edit_then_quit)


def test_run_screen_with_a_past_run(workdir, snap_compare):
    app = SamiApp(model="models/tiny", constitution="constitution.yaml", run="runs/demo")
    assert snap_compare(app, terminal_size=SIZE, run_before=steady)


def test_run_screen_with_a_verdict(workdir, snap_compare):
    """A finished demo run: the verdict card with adherence before/after per principle, the win rate,
    the kept adapters and why, each drift against its own limit, the run's warning as a note."""
    write_demo_result(workdir / "runs" / "demo")
    app = SamiApp(model="models/tiny", constitution="constitution.yaml", run="runs/demo")
    assert snap_compare(app, terminal_size=SIZE, run_before=steady)


@pytest.mark.parametrize("size", SMALL)
def test_run_screen_with_a_verdict_small(workdir, snap_compare, size):
    """The dashboard scrolls under the settings form; the verdict card comes first."""
    write_demo_result(workdir / "runs" / "demo")
    app = SamiApp(model="models/tiny", constitution="constitution.yaml", run="runs/demo")
    assert snap_compare(app, terminal_size=size, run_before=steady)


def test_run_picker(workdir, snap_compare, past_run):
    past_run(workdir / "runs", "older", finished=False)

    async def open_picker(pilot):
        await pilot.press("f2", "ctrl+o")
        await steady(pilot)

    assert snap_compare(SamiApp(constitution="constitution.yaml"), terminal_size=SIZE, run_before=open_picker)


def test_chat_screen_side_by_side(workdir, snap_compare):
    async def chat(pilot):
        await pilot.press("f3", "ctrl+b")  # the run's constitution is in the prompt by default
        await steady(pilot)

    app = SamiApp(constitution="constitution.yaml", run="runs/demo")
    assert snap_compare(app, terminal_size=SIZE, run_before=chat)


@pytest.mark.parametrize("size", SMALL)
def test_chat_screen_side_by_side_small(workdir, snap_compare, size):
    """The run, the checkpoint and max tokens stay on screen; the controls wrap rather than clip."""

    async def chat(pilot):
        await pilot.press("f3", "ctrl+b")
        await steady(pilot)

    app = SamiApp(constitution="constitution.yaml", run="runs/demo")
    assert snap_compare(app, terminal_size=size, run_before=chat)


def test_run_screen_at_120_columns_heat_map_and_drops(workdir, snap_compare):
    """The 8x8 score matrix of a 3-principle run stays readable at 120 columns: colour per cell, the
    variants' signs on rows and columns, the cursor's cell as a number; drop counts by reason."""
    labels = ["+++", "++-", "+-+", "+--", "-++", "-+-", "--+", "---"]
    scores = [[round(-1.0 - ((3 * i + 5 * j) % 8) / 3 - (0 if i == j else 0.5), 3) for j in range(8)] for i in range(8)]
    rows = [
        {"event": "SamplesReady", "iteration": 2, "groups": 3, "dropped_empty": 0, "dropped_identical": 1,
         "dropped_banned": 0, "dropped_truncated": 2, "dropped_unfinished": 1, "mean_length": 6.0,
         "no_eos_rate": 0.25, "distinct_2": 0.8, "tokens_per_sec": 900.0, "examples": []},
        {"event": "StepCompleted", "iteration": 2, "step": 2, "steps": 2, "global_step": 4, "loss": 0.25,
         "mi_bound": 0.5, "row_accuracy": 0.75, "column_accuracy": 0.75, "kl": 0.01, "learning_rate": 1e-3,
         "grad_norm": 1.0, "tokens_per_sec": 1000.0, "peak_memory_gb": 0.25, "scores": scores, "variants": labels},
    ]  # fmt: skip
    with (workdir / "runs" / "demo" / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    async def select_a_cell(pilot):
        pilot.app.screen.query_one("HeatTable").focus()
        await pilot.press("down", "down", "right")
        await steady(pilot)

    app = SamiApp(model="models/tiny", constitution="constitution.yaml", run="runs/demo")
    assert snap_compare(app, terminal_size=(120, 45), run_before=select_a_cell)


def test_run_settings_with_more_settings_open(workdir, snap_compare):
    async def open_more(pilot):
        await pilot.press("f2")
        title = pilot.app.screen.query_one("#more-settings CollapsibleTitle")
        title.scroll_visible(animate=False, immediate=True)
        await pilot.pause()
        await pilot.click(title)
        await pilot.pause()
        title.scroll_visible(animate=False, top=True, immediate=True)
        await steady(pilot)

    assert snap_compare(
        SamiApp(model="models/tiny", constitution="constitution.yaml"), terminal_size=SIZE, run_before=open_more
    )
