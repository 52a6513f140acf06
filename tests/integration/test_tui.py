"""The terminal UI driven as a user would, with Pilot: keys and clicks on each screen.

Includes a real SAMI run of the tiny model from the Run screen and a chat with its checkpoint.
"""

import ast
import asyncio
import contextlib
import io
import json
import re
import threading
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from textual import events
from textual.widgets import Checkbox, DataTable, Input, OptionList, Select

from sami_mlx import events as ev
from sami_mlx.cli.train import make_parser
from sami_mlx.cli.train_flags import build_config
from sami_mlx.config import TrainConfig
from sami_mlx.config_file import config_from_file
from sami_mlx.events import StepCompleted
from sami_mlx.fileio import read_jsonl
from sami_mlx.instruct import resolve_prompts
from sami_mlx.loop import trainer
from tui.app import SamiApp
from tui.chat_screen import ChatScreen
from tui.constitution_screen import ConstitutionScreen
from tui.heatmap import HeatTable, variant_labels
from tui.modals import ChoiceModal, ErrorModal, RunPicker
from tui.run_screen import RunScreen
from tui.settings_form import SettingsForm, absolute_paths
from tui.state.eta import Eta, eta_text
from tui.state.runlog import RunView, load_run, printable
from tui.widgets import PrincipleCard

SIZE = (160, 50)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run each app from a fresh folder, so that paths on screen are short and relative."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def paste(pilot, text: str) -> None:
    """Paste into the focused field, as a terminal delivers a paste (quicker than typing in tests)."""
    pilot.app.focused.post_message(events.Paste(text))
    await pilot.pause()


async def scroll_to(pilot, selector: str) -> None:
    """Scroll a field into view (the settings form is taller than the screen), as a user would."""
    pilot.app.screen.query_one(selector).scroll_visible(animate=False, immediate=True)
    await pilot.pause()


async def type_into(pilot, selector: str, text: str) -> None:
    """Click a field, clear it and type `text` (paste it, when long), as a user would."""
    await scroll_to(pilot, selector)
    await pilot.click(selector)
    await pilot.press("end", "ctrl+u")
    if len(text) > 4:
        await paste(pilot, text)
    else:
        await pilot.press(*text)


def shown(widget) -> str:
    """The text a Static widget shows (Rich tables and groups included)."""
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


def shown_text(text) -> str:
    return text.plain


def card_values(app) -> list[dict]:
    return [c.values() for c in app.screen.query(PrincipleCard)]


# ---- Constitution screen ---------------------------------------------------------------------


async def test_edit_validate_reorder_delete_and_save(workdir, constitution_file):
    app = SamiApp(constitution=str(constitution_file))
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, ConstitutionScreen)
        assert [p["name"] for p in card_values(app)] == ["brief", "kind"]

        # Add a principle after the first: empty fields are flagged on the card, not a crash.
        await pilot.click(".principle-name")
        await pilot.press("ctrl+n")
        cards = list(screen.query(PrincipleCard))
        assert len(cards) == 3 and cards[1].has_class("invalid")
        problems = shown(cards[1].query_one(".principle-problems"))
        assert "name is empty" in problems and "positive wording is empty" in problems
        status = shown(screen.query_one("#constitution-status"))
        assert "principle 2: field 'name' is empty; give it a name" in status

        # A duplicate name is flagged on both cards.
        await pilot.press(*"kind")
        assert all(c.has_class("invalid") for c in screen.query(PrincipleCard)[1:])
        assert "also principle 3" in shown(cards[1].query_one(".principle-problems"))
        await pilot.press("ctrl+a", "ctrl+k", *"honest", "tab")
        await paste(pilot, "Be honest.")
        await pilot.press("tab")
        await paste(pilot, "Mislead.")
        assert not any(c.has_class("invalid") for c in screen.query(PrincipleCard))

        # Reorder: the focused principle moves down, then the first one is deleted.
        await pilot.press("alt+down")
        assert [p["name"] for p in card_values(app)] == ["brief", "kind", "honest"]
        await pilot.click(".principle-name")
        await pilot.press("f8")
        assert [p["name"] for p in card_values(app)] == ["kind", "honest"]
        assert screen.dirty and "modified" in screen.sub_title

        await pilot.press("ctrl+s")
        assert not screen.dirty
    saved = yaml.safe_load(constitution_file.read_text())
    assert saved == {
        "name": "test",
        "principles": [
            {"name": "kind", "positive": "Be kind.", "negative": "Be rude."},
            {"name": "honest", "positive": "Be honest.", "negative": "Mislead."},
        ],
    }
    assert not list(workdir.glob(".constitution.yaml.*"))  # the atomic write left no temp file


async def test_a_file_with_mistakes_opens_flagged_and_is_saved_only_once_fixed(workdir):
    broken = workdir / "broken.yaml"
    broken.write_text(
        "name: b\nprinciples:\n  - {name: kind, positive: Be kind., negative: ''}\n"
        "  - {name: kind, positive: Be brief., negative: Ramble.}\n"
    )
    before = broken.read_text()
    app = SamiApp(constitution="broken.yaml")
    async with app.run_test(size=SIZE) as pilot:
        cards = list(app.screen.query(PrincipleCard))
        assert len(cards) == 2 and all(c.has_class("invalid") for c in cards)
        assert "negative wording is empty" in shown(cards[0].query_one(".principle-problems"))
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, ErrorModal)
        assert "principle 1 (kind): field 'negative' is empty" in app.screen.message
        await pilot.press("enter")
        assert isinstance(app.screen, ConstitutionScreen) and broken.read_text() == before

        await pilot.press("tab", "tab", *"Rude.")  # from the first name to its negative wording
        await pilot.click("#" + cards[1].id + " .principle-name")
        await pilot.press("end", "ctrl+u", *"brief", "ctrl+s")
        assert not any(c.has_class("invalid") for c in cards) and not app.screen.dirty
    assert yaml.safe_load(broken.read_text())["principles"][0]["negative"] == "Rude."


async def test_unsaved_changes_guard_on_quit(workdir, constitution_file):
    before = constitution_file.read_text()
    app = SamiApp(constitution=str(constitution_file))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.click(".principle-name")
        await pilot.press("end", *"-x")
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, ChoiceModal)  # asked, not quit
        await pilot.press("escape")  # cancel: still editing, nothing written
        assert isinstance(app.screen, ConstitutionScreen) and app.is_running
        assert constitution_file.read_text() == before

        await pilot.press("ctrl+q")
        await pilot.click("#choice-save")
    assert not app.is_running
    assert yaml.safe_load(constitution_file.read_text())["principles"][0]["name"] == "brief-x"

    app = SamiApp(constitution=str(constitution_file))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.click(".principle-name")
        await pilot.press("end", "y")
        await pilot.press("ctrl+q", "right", "enter")  # Discard
    assert not app.is_running
    assert yaml.safe_load(constitution_file.read_text())["principles"][0]["name"] == "brief-x"


async def test_new_file_save_as_and_open_with_preview(workdir, constitution_file):
    app = SamiApp()  # no file: a blank principle to fill in
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await pilot.press(*"brief", "tab")
        await paste(pilot, "Be brief.")
        await pilot.press("tab")
        await paste(pilot, "Ramble.")
        await pilot.click("#preview-variants")
        await pilot.press("end", "ctrl+u", *"grid")
        preview = shown(screen.query_one("#preview"))
        assert "2 variants per query" in preview and "1. Ramble." in preview
        await pilot.press("end", "ctrl+u", "5")
        assert "has only 2 distinct variants" in shown(screen.query_one("#preview"))

        await pilot.press("ctrl+s", "end", "ctrl+u")  # no file yet: asks where
        await paste(pilot, "mine.json")
        await pilot.press("enter")
        assert screen.path == Path("mine.json") and not screen.dirty

        await pilot.press("ctrl+o", "end", "ctrl+u")
        await paste(pilot, constitution_file.name)
        await pilot.press("enter")
        assert [p["name"] for p in card_values(app)] == ["brief", "kind"]
    data = json.loads((workdir / "mine.json").read_text())
    assert data["principles"] == [{"name": "brief", "positive": "Be brief.", "negative": "Ramble."}]


async def test_draft_principles_with_the_writer(workdir, tiny_model, constitution_file, monkeypatch):
    from sami_mlx import writer
    from sami_mlx.inputs.constitution import Constitution, Principle

    asked = {}

    def fake_draft(model, tokenizer, task, k, name="constitution", on_attempt=None, **kw):
        asked.update(task=task, k=k, name=name)
        on_attempt(1, "Principle 1: ...", None)
        return Constitution(name, (Principle("honest", "Be honest.", "Deceive."),))

    # The writer's model loads for real; what a random tiny model writes could never be read.
    monkeypatch.setattr(writer, "draft_constitution", fake_draft)
    # A random tiny model drifts at once: the degeneration guard would stop the run (tests/test_monitor.py).
    app = SamiApp(model=str(tiny_model), constitution=constitution_file.name, config={"max_ppl_ratio": None})
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await pilot.press("ctrl+g")
        await pilot.press(*"garden", "tab", "end", "backspace", "1", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ChoiceModal)  # two principles are there already: replace or add?
        await pilot.click("#choice-append")
        await pilot.pause()
        assert [p["name"] for p in card_values(app)] == ["brief", "kind", "honest"]
        assert screen.dirty
    assert asked == {"task": "garden", "k": 1, "name": "test"}


# ---- Run screen: a real run, cancel and resume, browse ---------------------------------------


async def fill_tiny_settings(pilot, queries: str) -> None:
    await type_into(pilot, "#set-queries", queries)
    await type_into(pilot, "#set-iterations", "1")
    await type_into(pilot, "#set-steps", "1")
    await type_into(pilot, "#set-queries_per_step", "2")
    await type_into(pilot, "#set-temperature", "1.0")
    await type_into(pilot, "#set-max_tokens", "6")
    await type_into(pilot, "#set-out", "runs/tiny")  # instead of a new runs/<date-time>


async def test_real_run_to_completion_then_chat_with_its_checkpoint(
    workdir, tiny_model, constitution_file, queries_file
):
    events = []

    def hook(message):
        if isinstance(message, RunScreen.RunEvent):
            events.append(message.event["event"])

    # A random tiny model drifts at once: the degeneration guard would stop the run (tests/test_monitor.py).
    app = SamiApp(model=str(tiny_model), constitution=constitution_file.name, config={"max_ppl_ratio": None})
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await pilot.press("f2")
        run = app.screen
        assert isinstance(run, RunScreen)
        assert run.query_one("#set-constitution", Input).value == "constitution.yaml"
        await fill_tiny_settings(pilot, queries_file.name)
        await pilot.press("ctrl+r")
        await app.workers.wait_for_complete()
        await pilot.pause()

        assert run.view.status == "finished", run.view.reason
        assert "finished" in shown(run.query_one("#run-title"))
        assert re.search(r"loss \d\.\d{4} ", shown(run.query_one("#run-stats")))
        assert run.query_one("#iterations-table", DataTable).row_count == 1
        # The score matrix's rows and columns: the variants of the group it scored (2 principles, all 4).
        assert [r.label.plain for r in run.query_one(HeatTable).ordered_rows] == ["++", "+−", "−+", "−−"]
        # The monitor's drift at the iteration's end, in the table and the verdict card (the guard is off).
        assert re.fullmatch(r"\d+\.\d\d/\d+\.\d\d", str(run.query_one("#iterations-table", DataTable).get_row_at(0)[2]))
        assert re.search(r"drift without constitution \d+\.\d\d× \(guard off\)", shown(run.query_one("#verdict")))
        assert "Q: " in shown(run.query_one("#samples"))
        assert app.run_dir == "runs/tiny"

        # Chat: the new run's latest checkpoint is offered and answers, streamed.
        await pilot.press("f3")
        chat = app.screen
        assert isinstance(chat, ChatScreen)
        assert [c.name for c in chat.checkpoints] == ["base", "iter-01"]
        assert chat.checkpoint().name == "iter-01"
        await type_into(pilot, "#chat-max-tokens", "8")
        await pilot.click("#message")
        await pilot.press(*"Hello", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        bubbles = list(chat.query("#transcript-main ChatBubble"))
        assert [b.role for b in bubbles] == ["user", "assistant"]
        assert bubbles[0].text == "Hello" and bubbles[1].text
        assert chat.history["main"][-1] == {"role": "assistant", "content": bubbles[1].text}

        # Side by side: one message, the base model and the checkpoint answer in two columns.
        await pilot.press("ctrl+b")
        await pilot.press(*"Hi", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert [b.role for b in chat.query("#transcript-base ChatBubble")] == ["user", "assistant"]
        assert len(chat.query("#transcript-main ChatBubble")) == 4
        assert not chat.generating

    assert events[:2] == ["StageProgress", "StageProgress"]  # the monitor's base answers, before the run starts
    assert events[2] == "RunStarted" and events[-1] == "RunCompleted"
    assert events.count("StepCompleted") == 1 and "SamplesReady" in events
    out = workdir / "runs" / "tiny"
    assert (out / "iter-01" / "adapters.safetensors").is_file()
    assert json.loads((out / "state.json").read_text())["finished"] is True
    # the step's score matrix is named by its group's query (the heat map's caption)
    step = next(r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "StepCompleted")
    assert step["query"] in queries_file.read_text().splitlines() and step["scores"]


class GatedTrainer:
    """The real engine, held after its first optimizer step until the test lets it go on."""

    def __init__(self):
        self.reached, self.release = threading.Event(), threading.Event()

    def train(self, cfg, callbacks=(), should_stop=None):
        def gate(event):
            if isinstance(event, StepCompleted) and event.global_step == 1:
                self.reached.set()
                self.release.wait(30)

        return trainer.train(cfg, [*callbacks, gate], should_stop)

    resume = staticmethod(trainer.resume)


async def test_stop_mid_run_leaves_a_resumable_run_and_resume_finishes_it(
    workdir, tiny_model, constitution_file, queries_file
):
    gated = GatedTrainer()
    # Settings from a YAML file, as `sami-mlx tui -c tiny.yaml` reads them (the form shows them).
    (workdir / "tiny.yaml").write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model),
                "constitution": constitution_file.name,
                "queries": queries_file.name,
                "iterations": 1,
                "steps": 3,
                "queries_per_step": 2,
                "temperature": 1.0,
                "max_tokens": 6,
                "seed": 7,
                "out": "runs/tiny",
            }
        )
    )
    app = SamiApp(config=config_from_file("tiny.yaml"), trainer=gated)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        run = app.screen
        assert run.query_one("#set-steps", Input).value == "3"
        await pilot.press("ctrl+r")
        for _ in range(600):
            if gated.reached.is_set():
                break
            await asyncio.sleep(0.05)
        assert gated.reached.is_set()
        assert run.running and run.check_action("start", ()) is False  # no second run meanwhile
        await pilot.press("ctrl+t")
        gated.release.set()
        await app.workers.wait_for_complete()
        await pilot.pause()

        out = workdir / "runs" / "tiny"
        state = json.loads((out / "state.json").read_text())
        assert run.view.status == "stopped" and not state["finished"]
        assert state["global_step"] == 1 and state["phase"] == "training"
        assert run.check_action("resume", ()) is True
        assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 7  # not on the form, still used

        await pilot.press("ctrl+y")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert run.view.status == "finished"
        assert sorted(run.view.steps) == [1, 2, 3]
    assert json.loads((out / "state.json").read_text())["finished"] is True
    steps = [r["global_step"] for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "StepCompleted"]
    assert steps == [1, 2, 3]


async def test_bad_settings_and_a_failing_run_show_errors_not_crashes(workdir, constitution_file):
    app = SamiApp(model="no/such/model/dir", constitution=constitution_file.name)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await type_into(pilot, "#set-learning_rate", "2")
        assert "learning-rate 2.0: must be between 0 and 1" in shown(app.screen.query_one("#settings-status"))
        await pilot.press("ctrl+r")
        assert isinstance(app.screen, ErrorModal) and "learning-rate" in app.screen.message
        await pilot.press("enter")

        await type_into(pilot, "#set-learning_rate", "0.001")
        await pilot.press("ctrl+r")  # the model does not exist: the worker reports it
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, ErrorModal)
        assert "--model no/such/model/dir" in app.screen.message
        await pilot.press("enter")
        assert app.screen.view.status == "failed" and not app.screen.running


async def test_browse_past_runs_from_metrics_and_samples(workdir, past_run):
    past_run(workdir / "runs", "a-finished")
    past_run(workdir / "runs", "b-killed", finished=False)
    app = SamiApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2", "ctrl+o")
        picker = app.screen
        assert isinstance(picker, RunPicker)
        options = picker.query_one(OptionList)
        labels = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert labels[0].startswith("b-killed  incomplete") and labels[1].startswith("a-finished  finished")
        await pilot.press("down", "enter")  # the finished one

        run = app.screen
        assert isinstance(run, RunScreen) and run.view.status == "finished"
        assert "runs/a-finished  finished" in shown(run.query_one("#run-title"))
        assert run.query_one("#iterations-table", DataTable).row_count == 2
        assert "loss  0.3100" in shown(run.query_one("#loss-plot .plot-title"))
        # The degeneration monitor: its last reading against each limit, per-iteration drift, what was kept.
        verdict = shown(run.query_one("#verdict"))
        assert "drift without constitution 1.62× ✗ (limit 1.5×)   with constitution 1.87× (limit 10×)" in verdict
        assert "held-out MI bound it1 +0.021  it2 +0.310 nats" in verdict
        assert "kept     iter-01 (no later iteration was healthy)" in verdict
        table = run.query_one("#iterations-table", DataTable)
        assert [str(c) for c in table.get_row_at(0)][1:3] == ["+0.021", "1.01/1.04"]
        assert str(table.get_row_at(1)[2]) == "1.62 ✗/1.87"
        assert run.query_one("#set-model", Input).value == "models/tiny"  # the form shows its settings
        samples = shown(run.query_one("#samples"))
        assert "Mix flour, water and yeast." in samples and "(dropped: degenerate group)" in samples
        assert run.check_action("resume", ()) is False  # a finished run has nothing to resume

        await pilot.press("f3")  # the opened run's checkpoints are offered for chat
        assert [c.name for c in app.screen.checkpoints] == ["base", "iter-01", "iter-02"]


# ---- Run screen: the settings form, its YAML file, the live dashboard ---------------------------


@contextlib.asynccontextmanager
async def settings_form(constitution_file):
    """An app on the tiny model, opened on the Run screen: `(app, pilot, its settings form)`."""
    app = SamiApp(model="models/tiny", constitution=constitution_file.name)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        yield app, pilot, app.screen.query_one(SettingsForm)


async def test_settings_save_then_load_round_trip_and_the_cli_accepts_the_file(workdir, constitution_file):
    async with settings_form(constitution_file) as (app, pilot, form):
        await type_into(pilot, "#set-steps", "5")
        await type_into(pilot, "#set-kl_beta", "0.125")
        await type_into(pilot, "#set-stop", "User:, ###")
        await type_into(pilot, "#set-generation_template", "chat")
        form.query_one("#set-schedule", Select).value = "continue"
        await scroll_to(pilot, "#more-settings CollapsibleTitle")
        await pilot.click("#more-settings CollapsibleTitle")  # the rest of TrainConfig, generated from FIELDS
        await pilot.pause()
        await scroll_to(pilot, "#set-dora")
        await pilot.click("#set-dora")
        await type_into(pilot, "#set-max_ppl_ratio", "off")
        await type_into(pilot, "#set-seed", "9")
        await type_into(pilot, "#set-sentence_end_marks", '[".", "…"]')
        assert form.query_one("#set-dora", Checkbox).value is True
        assert form.values()["chat_template"] is None  # auto until the model is known
        form.query_one("#set-chat_template", Select).value = "off"
        await pilot.pause()
        settings = form.values()
        assert settings["stop"] == ["User:", "###"] and settings["max_ppl_ratio"] is None
        assert settings["schedule"] == "continue" and settings["seed"] == 9 and "out" not in settings

        await pilot.press("ctrl+s", "end", "ctrl+u")
        await paste(pilot, "mine.yaml")
        await pilot.press("enter")
        assert (workdir / "mine.yaml").is_file()

        # Change the form, then load the file back: the settings are what was saved.
        await type_into(pilot, "#set-steps", "7")
        await scroll_to(pilot, "#set-dora")
        await pilot.click("#set-dora")
        await type_into(pilot, "#set-model", "other/model")
        assert form.values() != settings
        await pilot.press("ctrl+l", "end", "ctrl+u")
        await paste(pilot, "mine.yaml")
        await pilot.press("enter")
        # Files are saved by absolute path (a config finds relative paths next to itself, not here).
        assert form.values() == absolute_paths(settings)
        assert Path(form.values()["constitution"]).is_absolute()

        # A file the CLI would refuse is refused on load, in the error dialog; the form keeps its settings.
        (workdir / "bad.yaml").write_text("steps: 3\nwarp_speed: 9\n")
        await pilot.press("ctrl+l", "end", "ctrl+u")
        await paste(pilot, "bad.yaml")
        await pilot.press("enter")
        assert isinstance(app.screen, ErrorModal) and "unknown setting 'warp_speed'" in app.screen.message
        await pilot.press("enter")
        assert form.values() == absolute_paths(settings)

    # `sami-mlx train -c mine.yaml` reads the same settings (no training: only the parser and the config).
    cfg = build_config(make_parser().parse_args(["-c", str(workdir / "mine.yaml")]))
    expected = TrainConfig(**absolute_paths(settings), out=cfg.out).resolved()
    assert cfg == expected
    assert (cfg.steps, cfg.kl_beta, cfg.dora, cfg.seed, cfg.schedule) == (5, 0.125, True, 9, "continue")
    # The template was left blank (auto): the training template follows once the model is known.
    assert (cfg.generation_template, cfg.training_template, cfg.chat_template) == ("chat", None, False)
    assert resolve_prompts(cfg).training_template == "dialogue"
    assert cfg.sentence_end_marks == [".", "…"] and cfg.max_ppl_ratio is None


async def test_a_bad_setting_is_marked_in_the_form_and_saving_it_is_refused(workdir, constitution_file):
    async with settings_form(constitution_file) as (app, pilot, form):
        await type_into(pilot, "#set-kl_beta", "-1")
        assert "--kl-beta -1.0: must be between 0 and 1000000.0" in shown(form.query_one("#settings-status"))
        assert form.query_one("#set-kl_beta").has_class("invalid")
        assert not form.query_one("#set-steps").has_class("invalid")
        await pilot.press("ctrl+s", "end", "ctrl+u")
        await paste(pilot, "bad.yaml")
        await pilot.press("enter")
        assert isinstance(app.screen, ErrorModal) and "--kl-beta" in app.screen.message
        assert not (workdir / "bad.yaml").exists()
        await pilot.press("enter")
        await type_into(pilot, "#set-kl_beta", "0.5")
        assert not form.query_one("#set-kl_beta").has_class("invalid")


LABELS = ["++", "+-", "-+", "--"]
SCORES = [[-1.0, -2.0, -3.0, -4.0], [-2.5, -1.5, -2.25, -3.5], [-3.0, -2.75, -0.5, -2.0], [-4.0, -3.0, -2.0, -1.25]]


class ScriptedTrainer:
    """A run's first events at a measured pace (no model), held after its first step until released."""

    def __init__(self):
        self.reached, self.release = threading.Event(), threading.Event()

    def train(self, cfg, callbacks=(), should_stop=None):
        def emit(event):
            for callback in callbacks:
                callback(event)

        emit(ev.RunStarted(cfg.out, cfg.to_dict(), cfg.iterations, 6, 4, 100, None))
        emit(ev.IterationStarted(1, 2, 4))
        time.sleep(0.1)
        emit(ev.SamplingProgress(1, 16, 16))
        emit(ev.SamplesReady(1, 4, 0, 1, 0, 5.0, 0.0, 0.5, 10.0, dropped_truncated=2, dropped_unfinished=1))
        time.sleep(0.2)
        metrics = dict(loss=0.6, mi_bound=0.1, row_accuracy=0.5, column_accuracy=0.5, kl=0.0, learning_rate=1e-3)
        metrics.update(grad_norm=1.0, tokens_per_sec=10.0, peak_memory_gb=0.1, scores=SCORES, variants=LABELS)
        metrics.update(query="How do I bake bread?\nQuickly, please.")
        emit(ev.StepCompleted(iteration=1, step=1, steps=2, global_step=1, **metrics))
        self.reached.set()
        self.release.wait(30)
        emit(ev.RunCompleted(cfg.out, 1.0, stopped_early=True, reason="stopped"))


async def test_live_run_shows_eta_drops_and_a_labelled_heat_map(workdir, constitution_file):
    engine = ScriptedTrainer()
    config = {"iterations": 2, "steps": 2, "queries_per_step": 2, "out": "runs/live"}
    app = SamiApp(model="models/tiny", constitution=constitution_file.name, config=config, trainer=engine)
    async with app.run_test(size=(120, 45)) as pilot:
        await pilot.press("f2", "ctrl+r")
        for _ in range(200):
            if engine.reached.is_set():
                break
            await asyncio.sleep(0.05)
        await pilot.pause(0.2)
        run = app.screen
        assert re.search(r"ETA iteration 1: \d+s   run: \d+s", shown(run.query_one("#run-eta")))
        assert "dropped 1 identical, 2 truncated, 1 no sentence end" in shown(run.query_one("#run-stats"))

        # Rows (prompts) and columns (responses) are labelled by their variants' signs; colour carries the
        # value, and the cell under the cursor shows its number.
        table = run.query_one(HeatTable)
        signs = ["++", "+−", "−+", "−−"]
        assert [c.label.plain for c in table.ordered_columns] == signs
        assert [r.label.plain for r in table.ordered_rows] == signs
        value = run.query_one("#heatmap .heat-value")
        assert "c ++ × y ++  -1.000  (own response)" in shown(value)
        table.focus()
        await pilot.press("down", "right", "right")
        assert "c +− × y −+  -2.250" in shown(value)
        assert "-4.00" in shown(run.query_one("#heatmap .heat-title"))  # the colour scale's range
        # which query group the matrix is, on one line
        assert "step 1, query: How do I bake bread? Quickly, please." in shown(run.query_one("#heatmap .heat-query"))
        await pilot.hover(HeatTable, offset=(2 + 3 * 3 + 1, 1 + 3))  # past the row labels and the header
        assert "c −− × y −−  -1.250" in shown(value)

        engine.release.set()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not shown(run.query_one("#run-eta")).strip()  # no ETA once the run has ended
        table = run.query_one("#iterations-table", DataTable)
        assert str(table.get_row_at(0)[8]) == "4"  # dropped groups of the iteration, in all


# ---- pieces with no screen -------------------------------------------------------------------


def test_run_view_replays_metrics(workdir, past_run):
    view = load_run(past_run(workdir, "r", finished=False))
    assert view.status == "incomplete" and view.iterations == 2 and view.total_steps == 3
    assert view.series("loss") == [0.69, 0.52, 0.31] and view.completed_iterations == 1
    assert view.last_step["scores"] == [[-2.0, -3.5], [-3.0, -1.5]]


def test_eta_from_the_rates_seen_so_far():
    events = [
        (0, {"event": "RunStarted", "run_dir": "r", "iterations": 2, "total_steps": 6, "num_variants": 2,
             "config": {"steps": 2, "queries_per_step": 2, "schedule": "paper"}}),
        (0, {"event": "IterationStarted", "iteration": 1, "steps": 2, "queries": 4}),
        (4, {"event": "SamplingProgress", "iteration": 1, "done": 4, "total": 8}),
    ]  # fmt: skip
    eta, view = Eta(), RunView()
    for now, e in events:
        view.apply(e)
        eta.observe(e, now)
    assert shown_text(eta_text(eta, view, 4)) == "ETA measuring the first optimizer step…"
    for now, e in [
        (8, {"event": "SamplesReady", "iteration": 1, "groups": 4}),  # 8 responses in 8 s
        (18, {"event": "StepCompleted", "iteration": 1, "step": 1, "steps": 2, "global_step": 1}),  # 10 s a step
    ]:
        view.apply(e)
        eta.observe(e, now)
    # This iteration: 1 step (10 s). The next, paper schedule: 4 steps (40 s) on 4 x 2 x 2 = 16 responses (16 s).
    assert shown_text(eta_text(eta, view, 18)) == "ETA iteration 1: 10s   run: 1m 06s   (from the rates so far)"
    assert "iteration 1: 5s   run: 1m 01s" in shown_text(eta_text(eta, view, 23))  # counts down between events
    view.apply({"event": "RunCompleted", "run_dir": "r"})
    assert shown_text(eta_text(eta, view, 30)) == ""


async def test_heat_map_of_a_run_logged_without_variant_labels(workdir, past_run):
    past_run(workdir / "runs", "old")  # StepCompleted without `variants`, 2 variants drawn per group
    app = SamiApp(run="runs/old")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        table = app.screen.query_one(HeatTable)
        assert [r.label.plain for r in table.ordered_rows] == ["v1", "v2"]
        assert "c v1 × y v1  -2.000  (own response)" in shown(app.screen.query_one("#heatmap .heat-value"))
        # no query in the log: say which step the group is from, and no more
        assert shown(app.screen.query_one("#heatmap .heat-query")).strip() == "first query group of step 3"


async def test_path_fields_show_the_end_of_a_long_path(workdir, constitution_file):
    """Paths under one folder differ at their end: a narrow field not being edited shows that end."""
    app = SamiApp(constitution=constitution_file.name)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f2")
        form = app.screen.query_one(SettingsForm)
        long = "/home/someone/projects/alignment/experiments/queries-for-the-second-study.txt"
        form.show({"queries": long})
        await pilot.pause()
        box = form.query_one("#set-queries", Input)
        assert box.scroll_x > 0
        assert "".join(segment.text for segment in box.render_line(0)).rstrip().endswith("-study.txt")
        box.focus()
        await pilot.press("home")  # editing: the field scrolls where the cursor goes, as any field does
        await pilot.pause()
        assert box.scroll_x == 0
        app.screen.query_one("#set-model", Input).focus()  # left again: the end shows again
        await pilot.pause()
        assert box.scroll_x > 0


def test_heat_map_labels_of_runs_logged_without_them():
    assert variant_labels(4, {"variants": "auto"}, 2) == ["++", "+-", "-+", "--"]  # all 2^k, in order
    assert variant_labels(2, {"variants": "paper"}, 2) == ["v1", "v2"]  # drawn per group: unknown
    assert variant_labels(2, {}, 2) == ["v1", "v2"]


def test_model_output_is_made_printable():
    assert printable("ok\x04\x1b[2Jdone\n") == "ok\ufffd\ufffd[2Jdone\n"


def test_cli_refuses_a_run_folder_without_metrics(tmp_path, capsys):
    from sami_mlx.cli.main import main

    assert main(["tui", "--run", str(tmp_path)]) == 2
    assert "no metrics.jsonl there" in capsys.readouterr().err


def test_the_engine_never_imports_textual():
    """sami_mlx is the core: the TUI imports it, never the reverse (a static scan of its source)."""
    offenders = []
    for path in sorted((ROOT / "sami_mlx").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] in ("textual", "tui")
            ]
    assert not offenders, f"sami_mlx must not import textual or tui: {offenders}"
