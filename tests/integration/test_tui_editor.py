"""The constitution editor never loses an edit: a file's comments and unknown keys survive a save,
ctrl+d in a field deletes a character, a deleted principle comes back with ctrl+z; and `?` shows
the keys of the screen it is pressed on."""

import difflib
import json

import pytest
from textual.widgets import Input

from sami_mlx.inputs.constitution import load_constitution
from tui.app import SamiApp
from tui.constitution_screen import ConstitutionScreen
from tui.modals import HelpModal
from tui.widgets import PrincipleCard

SIZE = (160, 50)

COMMENTED = """\
# Kept through any edit: this comment, the description, and the key order.
name: house-style  # what the run directory calls it
description: Principles for the help desk; reviewed monthly.
principles:
  # The first principle.
  - name: brief
    positive: "Be brief."   # quoted on purpose
    negative: Be long-winded.
    source: style guide, section 2
  - name: kind
    positive: Be kind to the person asking.
    negative: Be rude.
  - {name: honest, positive: Say what you know., negative: Make things up.}
reviewers: [ana, ben]
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def house(workdir):
    """house.yaml in the working folder, holding COMMENTED."""
    path = workdir / "house.yaml"
    path.write_text(COMMENTED)
    return path


async def edit(pilot, card: int, field: str, *keys: str) -> None:
    """Click principle `card`'s `field` (name, positive or negative) and press `keys` there."""
    await pilot.click(f"#{cards(pilot.app)[card].id} .principle-{field}")
    await pilot.press(*keys)


def diff(before: str, after: str) -> list[str]:
    """The changed lines of a unified diff, without its headers."""
    lines = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return [line for line in lines if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def cards(app) -> list[PrincipleCard]:
    return list(app.screen.query(PrincipleCard))


def names(app) -> list[str]:
    return [c.values()["name"] for c in cards(app)]


async def test_one_word_edited_and_saved_changes_only_that_word(house):
    app = SamiApp(constitution="house.yaml")
    async with app.run_test(size=SIZE) as pilot:
        # "Be kind to the person asking.": "person" → "user"
        await edit(pilot, 1, "positive", "end", "ctrl+left", "ctrl+w", *"user ")
        assert cards(app)[1].values()["positive"] == "Be kind to the user asking."
        await pilot.press("ctrl+s")
        assert not app.screen.dirty
    assert diff(COMMENTED, house.read_text()) == [
        "-    positive: Be kind to the person asking.",
        "+    positive: Be kind to the user asking.",
    ]


async def test_a_quoted_wording_keeps_its_quotes_and_comment_when_edited(house):
    app = SamiApp(constitution="house.yaml")
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, 0, "positive", "end", "backspace", *"!")  # "Be brief." → "Be brief!"
        await edit(pilot, 2, "negative", "end", "ctrl+w", *"stuff.")  # "Make things up." → "Make things stuff."
        await pilot.press("ctrl+s")
    assert diff(COMMENTED, house.read_text()) == [
        '-    positive: "Be brief."   # quoted on purpose',
        '+    positive: "Be brief!"   # quoted on purpose',
        "-  - {name: honest, positive: Say what you know., negative: Make things up.}",
        "+  - {name: honest, positive: Say what you know., negative: Make things stuff.}",
    ]


async def test_ctrl_d_in_a_field_deletes_a_character_not_the_principle(house):
    app = SamiApp(constitution="house.yaml")
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, 1, "name", "home", "ctrl+d")
        assert names(app) == ["brief", "ind", "honest"]  # one character gone, all three principles there
        assert isinstance(app.focused, Input) and app.focused.value == "ind"


async def test_a_deleted_principle_comes_back_with_ctrl_z_where_it_was(house):
    app = SamiApp(constitution="house.yaml")
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, ConstitutionScreen)
        assert not [b for b in screen.active_bindings.values() if b.binding.action == "undo"]  # nothing to undo
        await edit(pilot, 0, "name", "f8")
        assert names(app) == ["kind", "honest"] and screen.dirty
        assert [b for b in screen.active_bindings.values() if b.binding.action == "undo"]  # Undo in the footer
        await edit(pilot, 1, "name", "f8")
        assert names(app) == ["kind"]

        await pilot.press("ctrl+z")  # the last deletion first
        assert names(app) == ["kind", "honest"]
        await pilot.press("ctrl+z")
        assert names(app) == ["brief", "kind", "honest"]
        assert cards(app)[0].values() == {"name": "brief", "positive": "Be brief.", "negative": "Be long-winded."}
        assert not screen.dirty  # back as it was: nothing to save
        await pilot.press("ctrl+z")  # nothing left to undo: no change, no error
        assert names(app) == ["brief", "kind", "honest"]

        # Restored entries keep their place in the file: saving changes nothing.
        await pilot.press("ctrl+s")
    assert house.read_text() == COMMENTED


async def test_deleting_adding_and_moving_keep_the_files_other_content(house):
    app = SamiApp(constitution="house.yaml")
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, 2, "name", "alt+up")  # honest before kind
        await pilot.press("ctrl+n", *"calm", "tab")  # a new principle after honest
        await pilot.press(*"Stay calm.", "tab", *"Panic.")
        await edit(pilot, 0, "name", "f8")  # brief goes
        assert names(app) == ["honest", "calm", "kind"]
        await pilot.press("ctrl+s")
        assert not app.screen.dirty
    text = house.read_text()
    for kept in COMMENTED.splitlines()[:4] + ["reviewers: [ana, ben]", "  - {name: honest, positive: Say what"]:
        assert kept.split("  #")[0] in text
    assert "source: style guide" not in text  # it belonged to the deleted principle
    c = load_constitution(house)
    assert [p.name for p in c.principles] == ["honest", "calm", "kind"]
    assert c.principles[1].positive == "Stay calm." and c.principles[1].negative == "Panic."


async def test_a_json_constitution_keeps_its_unknown_keys(workdir):
    path = workdir / "c.json"
    data = {
        "name": "j",
        "version": 3,
        "principles": [{"name": "brief", "positive": "Be brief.", "negative": "Ramble.", "weight": 2}],
        "notes": {"owner": "ana"},
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    app = SamiApp(constitution="c.json")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.click(".principle-negative")
        await pilot.press("end", "backspace", *" on.")
        await pilot.press("ctrl+s")
    data["principles"][0]["negative"] = "Ramble on."
    assert path.read_text() == json.dumps(data, indent=2) + "\n"


async def test_a_yaml_word_the_engine_would_misread_is_quoted(house):
    app = SamiApp(constitution="house.yaml")
    async with app.run_test(size=SIZE) as pilot:
        await edit(pilot, 1, "negative", "end", "ctrl+u", *"no")  # plain `no` is a boolean to YAML 1.1 readers
        await pilot.press("ctrl+s")
        assert not app.screen.dirty
    assert "    negative: 'no'" in house.read_text()
    assert load_constitution(house).principles[1].negative == "no"


# ---- help -------------------------------------------------------------------------------------


def help_keys(app) -> dict[str, str]:
    """The help modal's rows as key → description."""
    modal = app.screen
    assert isinstance(modal, HelpModal)
    return dict(modal.rows)


async def test_question_mark_shows_the_keys_of_the_screen_it_is_pressed_on(workdir, constitution_file):
    app = SamiApp(constitution=str(constitution_file))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")  # the run screen: focus is not in a text field
        app.screen.set_focus(None)
        await pilot.press("question_mark")
        keys = help_keys(app)
        assert keys["ctrl+r"] == "Start run" and keys["ctrl+o"] == "Open run" and keys["f1"] == "Constitution"
        assert "ctrl+t" not in keys  # Stop run: no run to stop, so not listed (the screen's own check)
        assert "f8" not in keys  # the editor's keys belong to the editor
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpModal)

        await pilot.press("f1")
        await pilot.press("question_mark")  # in a text field, `?` is typed
        assert not isinstance(app.screen, HelpModal)
        assert "?" in app.focused.value
        await pilot.press("backspace")
        palette_help = next(c for c in app.get_system_commands(app.screen) if c.title == "Help")
        await palette_help.callback()  # the palette's Help works from a text field
        await pilot.pause()
        keys = help_keys(app)
        assert keys["f8"] == "Delete" and keys["ctrl+s"] == "Save" and "ctrl+d" not in keys
        shown = app.screen.query_one("#help-keys Static").content.plain
        assert "Keys of the Constitution screen" in str(app.screen.query_one(".dialog-title").content)
        assert "f8" in shown and "Delete the focused principle (ctrl+z brings it back)" in shown
        await pilot.press("question_mark")  # `?` closes it too
        assert isinstance(app.screen, ConstitutionScreen)


async def test_the_palette_lists_quit_once_and_help(workdir, constitution_file):
    app = SamiApp(constitution=str(constitution_file))
    async with app.run_test(size=SIZE):
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert titles.count("Quit") == 1 and titles.count("Help") == 1
        assert len(titles) == len(set(titles))
