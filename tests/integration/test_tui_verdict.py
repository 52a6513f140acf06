"""The verdict card on a run's dashboard and chat as the run trained, driven with Pilot as a user would."""

import io
import json
import re
from pathlib import Path

import mlx_lm
import pytest
import yaml
from helpers import PromptRecorder, randomise_lora_b, write_demo_result
from rich.console import Console
from rich.table import Table
from rich.text import Text
from textual.widgets import Checkbox, Input, Select, Static

import tui.chat_screen
from sami_mlx.inputs.constitution import load_constitution
from sami_mlx.inputs.prompts import load_template
from sami_mlx.loop.adapters import attach_adapters, save_adapters
from tui.app import SamiApp
from tui.chat_screen import ChatScreen
from tui.constitution_screen import ConstitutionScreen
from tui.modals import ErrorModal, EvalModal, HelpModal, PathModal
from tui.run_screen import PAIRS, RunScreen
from tui.state.run_dashboard import verdict_rows
from tui.state.runlog import load_run, read_result
from tui.widgets import PrincipleCard

SIZE = (160, 50)
PRINCIPLES = [
    {"name": "kind", "positive": "Answer kindly.", "negative": "Answer rudely."},
    {"name": "brief", "positive": "Keep it short.", "negative": "Ramble on."},
]
TEMPLATE = "Rules of the house:\n{constitution}\n\nHuman: {query}\n\nAssistant:"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def shown(widget: Static) -> str:
    """The text a Static shows, as a 200-column terminal draws it (tables included)."""
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


def style_of(widget: Static, text: str) -> str:
    """The style of the span that shows `text` in the verdict card (its colour says within or past a limit)."""
    card = widget.content
    assert isinstance(card, Table)
    cell = next(c for c in card.columns[1]._cells if isinstance(c, Text) and text in c.plain)
    start = cell.plain.index(text)
    styles = [str(s.style) for s in cell.spans if s.start <= start < s.end]
    return styles[-1] if styles else ""


@pytest.fixture
def demo_run(workdir, past_run, tiny_model) -> Path:
    """A finished demo-like run of the real tiny model: its own constitution and template (files in the
    run, as the demo writes them), real adapters per iteration, demo.json and state.json (iter-01 kept)."""
    run = write_demo_result(past_run(workdir / "runs", "demo"))
    (run / "constitution.yaml").write_text(yaml.safe_dump({"name": "house", "principles": PRINCIPLES}))
    (run / "template.txt").write_text(TEMPLATE)
    config = {
        "model": str(tiny_model),
        "constitution": str(run / "constitution.yaml"),
        "queries": "dialogue",
        "template": str(run / "template.txt"),
        "generation_template": str(run / "template.txt"),
        "training_template": str(run / "template.txt"),
        "chat_template": False,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    model, _ = mlx_lm.load(str(tiny_model))
    adapter_config = attach_adapters(model, rank=4, scale=10.0)
    for folder in ("iter-01", "iter-02", "."):
        randomise_lora_b(model)
        save_adapters(model, run / folder, adapter_config)
    return run


# ---- the verdict card ------------------------------------------------------------------------------


async def test_a_finished_demo_shows_its_verdict_kept_adapters_and_health(demo_run):
    app = SamiApp(run="runs/demo")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        run = app.screen
        assert isinstance(run, RunScreen)
        card = run.query_one("#verdict", Static)
        text = shown(card)
        # The result, before/after, and a bar per principle (the held-out one marked).
        assert "adherence 0.58 → 0.84   win rate vs base 74% (95% CI 66%–81%)" in text
        assert "iter-01 against base, n 96, judged by the world's checker (demo.json)" in text
        chart = [line.strip() for line in text.splitlines()]  # the card's lines, less its heading column
        assert "kind" in chart and chart[chart.index("kind") + 1 :][:2] == [
            "base ██████░░░░ 0.55",
            "SAMI █████████░ 0.86",
        ]
        held_out = chart.index("polite (held out)")
        assert chart[held_out + 1 : held_out + 3] == ["base █████░░░░░ 0.49", "SAMI ████░░░░░░ 0.45"]
        assert "red" in style_of(card, "████░░░░░░ 0.45")  # the held-out principle got worse
        # The kept adapters and why (state.json), and each drift against its own limit.
        assert "kept     iter-01: best held-out MI bound, +0.021 nats" in text
        assert "drift without constitution 1.62× ✗ (limit 1.5×)   with constitution 1.87× (limit 10×)" in text
        assert "red" in style_of(card, "1.62×") and "green" in style_of(card, "1.87×")
        # One MI number per iteration, named as docs/MONITOR.md names it; the others say what they are.
        assert "held-out MI bound it1 +0.021  it2 +0.310 nats" in text
        assert "train MI ≥ 0.3800" in shown(run.query_one("#run-stats", Static))
        # A finished run: no idle sampling bar, and its warnings are notes in the card, not a ⚠ headline.
        assert not run.query_one("#sampling-box").display
        assert "⚠" not in shown(run.query_one("#run-stats", Static))
        assert "note     iteration 2: the query split has 3 queries" in text


async def test_a_run_without_a_result_names_the_command_that_measures_it(workdir, past_run):
    past_run(workdir / "runs", "plain")
    app = SamiApp(run="runs/plain")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        text = shown(app.screen.query_one("#verdict", Static))
        command = "sami-mlx eval --run runs/plain --iterations iter-01 --queries HELDOUT --judge JUDGE"
        assert "result   not measured yet" in text and command in text
        await pilot.press("f5")  # the dialog that measures it, with the command copied for elsewhere
        assert isinstance(app.screen, EvalModal)
        assert app.clipboard.startswith("sami-mlx eval --run runs/plain --iterations iter-01 --queries")


def test_an_eval_result_gives_the_kept_checkpoints_win_rate_per_principle(workdir, past_run):
    run = past_run(workdir / "runs", "judged")
    (run / "eval").mkdir()
    result = {
        "checkpoint": "iter-01",
        "win_rate": 0.62,
        "win_rate_ci": [0.52, 0.71],
        "n": 100,
        "judge": {"kind": "local", "model": "judge-7b"},
        "intrinsic": {"base": {"mi_bound": 0.01}, "checkpoint": {"mi_bound": 0.2}},
        "per_principle": {"kind": {"win_rate": 0.7}, "brief": {"win_rate": 0.4}},
    }
    (run / "eval" / "iter-01.json").write_text(json.dumps(result))
    (run / "eval" / "iter-02.json").write_text(json.dumps({**result, "checkpoint": "iter-02", "win_rate": 0.3}))
    (run / "eval" / "summary.json").write_text("[]")
    measured = read_result(run, "iter-01")
    assert measured is not None and measured.checkpoint == "iter-01"  # the kept one, not the newest
    text = "\n".join(
        f"{heading}: {text.plain}" for heading, text in verdict_rows(load_run(run), measured, ("iter-01", ""))
    )
    assert "win rate vs base 62% (95% CI 52%–71%)   held-out MI bound +0.010 → +0.200 nats" in text
    assert "iter-01 against base, n 100, judged by judge-7b (eval/iter-01.json)" in text
    assert "kind\n  win rate ███████░░░ 0.70" in text and "brief\n  win rate ████░░░░░░ 0.40" in text
    (run / "eval" / "iter-01.json").write_text("{torn")
    assert read_result(run, "iter-01") is None  # a torn file: no verdict, no crash


# ---- chat as trained -------------------------------------------------------------------------------


async def test_chat_on_a_run_prompts_as_training_did_and_labels_the_kept_checkpoint(demo_run, monkeypatch):
    recorder = PromptRecorder(tui.chat_screen.stream_reply)
    monkeypatch.setattr(tui.chat_screen, "stream_reply", recorder)
    app = SamiApp(run="runs/demo")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        chat = app.screen
        assert isinstance(chat, ChatScreen)
        select = chat.query_one("#checkpoint", Select)
        labels = [str(prompt) for prompt, value in select._options if isinstance(value, str)]
        assert labels == ["base", "iter-01 (kept)", "iter-02"]  # not all "(aligned)"; the kept one marked
        assert chat.checkpoint().name == "iter-01"  # what RUN/adapters.safetensors holds
        assert chat.query_one("#use-constitution", Checkbox).value  # on: the run trained with one
        prompt = shown(chat.query_one("#chat-prompt", Static))
        assert "prompt as the run trained: its constitution house (2 principles) in template template.txt" in prompt
        await pilot.press("ctrl+t")
        assert "no constitution, unlike training" in shown(chat.query_one("#chat-prompt", Static))
        await pilot.press("ctrl+t")

        await pilot.press("ctrl+b")
        titles = [shown(t).strip() for t in chat.query(".column-title")]
        assert titles == ["base", "iter-01 (kept)"]
        chat.query_one("#chat-max-tokens").value = "3"
        await pilot.click("#message")
        await pilot.press(*"Hello", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()

    # Both sides' first prompt: the run's template around its constitution, rendered as training renders it.
    constitution = load_constitution(str(demo_run / "constitution.yaml"))
    expected = load_template(str(demo_run / "template.txt")).fill(
        constitution.render(constitution.positive_variant), "Hello"
    )
    assert "1. Answer kindly.\n2. Keep it short." in expected
    assert len(recorder.prompts) == 2
    for tokenizer, ids in recorder.prompts:
        assert ids == list(tokenizer.encode(expected))
        assert "Rules of the house:\n1. Answer kindly.\n2. Keep it short.\n\nHuman: Hello" in tokenizer.decode(ids)


async def test_a_new_run_retargets_chat_only_with_a_notice_and_true_labels(demo_run, past_run, workdir):
    app = SamiApp(run="runs/demo")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        chat = app.screen
        chat.query_one("#chat-max-tokens").value = "2"
        await pilot.click("#message")
        await pilot.press(*"Hi", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert len(chat.query("#transcript-main ChatBubble")) == 2

        # A run started (and stopped) on the Run screen becomes the app's run when it ends.
        other = past_run(workdir / "runs", "fresh", finished=False)
        (other / "config.yaml").write_text((demo_run / "config.yaml").read_text())
        await pilot.press("f2")
        app.screen.post_message(RunScreen.RunEnded(str(other)))
        await pilot.pause()
        await pilot.pause()  # the screen's RunChosen reaches the app (it bubbles), which records the run
        assert app.session.run_dir == str(other)
        await pilot.press("f3")
        await pilot.pause()
        notes = [n.message for n in app._notifications]
        assert any("chat now talks to run runs/fresh; the earlier replies were cleared" in n for n in notes)
        assert not chat.query("ChatBubble") and chat.history == {"base": [], "main": []}
        assert [c.name for c in chat.checkpoints] == ["base", "iter-01"]
        assert shown(chat.query_one("#main-title", Static)).strip() == "iter-01"  # not kept: that run kept nothing yet
        assert "run runs/fresh" in shown(chat.query_one("#chat-source", Static))


# ---- measuring a run from its dashboard -------------------------------------------------------------


async def test_f5_measures_the_run_with_sami_mlx_eval_and_the_card_shows_it(trained_run, tiny_model, workdir):
    run = trained_run(iterations=1) / "run"
    (workdir / "held.txt").write_text("Name a colour.\nGive me a tip for sleeping well.\n")
    seen: list = []
    app = SamiApp(run=str(run))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await pilot.pause()
        screen = app.screen
        assert "not measured yet" in shown(screen.query_one("#verdict", Static))
        await pilot.press("f5")
        modal = app.screen
        assert isinstance(modal, EvalModal)
        # A first guess to edit: the run's base model judges; the command is shown and copied.
        assert modal.query_one("#eval-judge", Input).value == str(tiny_model)
        modal.query_one("#eval-queries", Input).value = "held.txt"
        modal.query_one("#eval-limit", Input).value = "2"
        await pilot.pause()
        assert app.clipboard.startswith(f"sami-mlx eval --run {run}") and "--queries held.txt" in app.clipboard
        await pilot.press("enter")
        await pilot.pause()
        assert screen.query_one("#eval-row").display  # progress shows while it runs
        await app.workers.wait_for_complete()
        await pilot.pause()
        ended = [m for m in seen if isinstance(m, RunScreen.EvalEnded)]
        assert [m.code for m in ended] == [0], ended[0].message if ended else seen
        assert any(isinstance(m, RunScreen.EvalProgress) and m.total for m in seen)
        assert not screen.query_one("#eval-row").display
        # The verdict card now reads the result file `sami-mlx eval` wrote.
        results = list((run / "eval").glob("iter-*.json"))
        assert len(results) == 1 and json.loads(results[0].read_text())["n"] == 2
        text = shown(screen.query_one("#verdict", Static))
        assert "not measured yet" not in text
        assert re.search(r"result   win rate vs base \d+% \(95% CI \d+%–\d+%\)", text), text


# ---- the run's constitution in the editor, and help from a text field ------------------------------


async def test_f1_with_a_run_opens_its_constitution_read_only_until_saved_elsewhere(demo_run, workdir):
    own = demo_run / "constitution.yaml"
    before = own.read_text()
    app = SamiApp(run="runs/demo")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        await pilot.pause()
        editor = app.screen
        assert isinstance(editor, ConstitutionScreen)
        assert [c.values()["name"] for c in editor.query(PrincipleCard)] == ["kind", "brief"]  # not a blank one
        assert "the run's: read-only" in shown(editor.query_one("#constitution-status", Static))
        editor.query(PrincipleCard).first().query_one(".principle-name", Input).value = "kindly"
        await pilot.press("ctrl+s")  # asks where instead of writing the run's record
        assert isinstance(app.screen, PathModal)
        app.screen.query_one(Input).value = "runs/demo/constitution.yaml"
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ErrorModal) and own.read_text() == before
        await pilot.press("escape")
        await pilot.press("f4")
        app.screen.query_one(Input).value = "mine.yaml"
        await pilot.press("enter")
        await pilot.pause()
        assert own.read_text() == before and "kindly" in (workdir / "mine.yaml").read_text()
        assert app.session.constitution_path == "mine.yaml"  # told to the app by ConstitutionSaved
        assert "read-only" not in shown(editor.query_one("#constitution-status", Static))


async def test_question_mark_opens_help_from_an_empty_field_and_types_into_a_filled_one(demo_run):
    app = SamiApp(run="runs/demo")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        run = app.screen
        field = run.query_one("#set-model", Input)  # where the Run screen puts the cursor
        field.focus()
        field.value = ""
        await pilot.press("question_mark")
        await pilot.pause()
        assert field.value == "", field.value
        assert isinstance(app.screen, HelpModal) and "Keys of the Run screen" in app.screen.title_text
        await pilot.press("escape")
        field.value = "model"
        await pilot.press("end", "question_mark")
        assert app.screen is run and field.value == "model?"


async def test_samples_show_base_and_aligned_replies_to_the_same_query_side_by_side(workdir, past_run):
    run = past_run(workdir / "runs", "judged")
    (run / "eval").mkdir()
    items = [{"query": "Name a colour.", "base": "blue blue blue", "checkpoint": "Blue, kindly.", "verdict": "B"}]
    result = {"checkpoint": "iter-01", "win_rate": 1.0, "win_rate_ci": [0.2, 1.0], "n": 1, "items": items}
    (run / "eval" / "iter-01.json").write_text(json.dumps({**result, "judge": {"kind": "local", "model": "j"}}))
    app = SamiApp(run="runs/judged")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select = app.screen.query_one("#samples-iteration", Select)
        assert [str(label) for label, _ in select._options[1:]] == ["iter-01", "base vs aligned"]
        assert "Q: " in shown(app.screen.query_one("#samples", Static))  # the newest iteration's, as before
        select.value = PAIRS
        await pilot.pause()
        lines = shown(app.screen.query_one("#samples", Static)).splitlines()
        assert "iter-01 against base (eval/iter-01.json)" in lines[0]
        assert re.match(r"\s*base\s+aligned", lines[1])
        row = next(line for line in lines if "blue blue blue" in line)
        assert "Blue, kindly." in row  # the same query's replies on one row
        assert any("Q: Name a colour." in line for line in lines)
