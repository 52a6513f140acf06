"""SVG snapshots of each screen (pytest-textual-snapshot); refresh with --snapshot-update.

Deterministic by construction: fixed terminal size, relative paths (each test runs in its own
folder), fixed numbers in the past run, no clock, and no blinking cursors.
"""

from pathlib import Path

import pytest
import pytest_textual_snapshot
from textual.widgets import Input

from tui.app import SamiApp

SIZE = (150, 45)


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


async def steady(pilot) -> None:
    """No blinking cursor in a screenshot."""
    await pilot.pause()
    for box in pilot.app.screen.query(Input):
        box.cursor_blink = False
    await pilot.pause()


def test_constitution_screen(workdir, snap_compare):
    assert snap_compare(SamiApp(constitution="constitution.yaml"), terminal_size=SIZE, run_before=steady)


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


def test_run_picker(workdir, snap_compare, past_run):
    past_run(workdir / "runs", "older", finished=False)

    async def open_picker(pilot):
        await pilot.press("f2", "ctrl+o")
        await steady(pilot)

    assert snap_compare(SamiApp(constitution="constitution.yaml"), terminal_size=SIZE, run_before=open_picker)


def test_chat_screen_side_by_side(workdir, snap_compare):
    async def chat(pilot):
        await pilot.press("f3", "ctrl+b", "ctrl+t")
        await steady(pilot)

    app = SamiApp(constitution="constitution.yaml", run="runs/demo")
    assert snap_compare(app, terminal_size=SIZE, run_before=chat)
