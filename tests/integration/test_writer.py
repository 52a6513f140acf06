"""The principle writer: its parser on well-formed and broken answers, retries, and `sami-mlx write`."""

from __future__ import annotations

import pytest

import sami_mlx.writer as writer
from sami_mlx.cli.main import main
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import load_constitution
from sami_mlx.writer import DraftError, draft_with, parse_principles

WELL_FORMED = {
    "the asked format": """\
Principle 1: Honesty
Positive: Tell the truth, and say when you are unsure.
Negative: Make things up and sound certain.

Principle 2: Brevity
Positive: Keep answers short.
Negative: Pad answers with filler.""",
    "chatter and markdown": """\
Sure! Here are two principles for a cooking assistant:

### 1. **Honesty**
- **Positive:** Tell the truth, and say when you are unsure.
- **Antithesis:** Make things up and sound certain.

### 2. **Brevity**
- **Positive:** Keep answers short.
- **Negative:** Pad answers with filler.

I hope this helps!""",
    "JSON in a code fence": """\
```json
{"name": "cooking", "principles": [
  {"name": "Honesty", "principle": "Tell the truth, and say when you are unsure.",
   "antithesis": "Make things up and sound certain."},
  {"title": "Brevity", "positive": "Keep answers short.", "negative": "Pad answers with filler."}
]}
```""",
    "YAML": """\
name: cooking
principles:
  - name: Honesty
    positive: Tell the truth, and say when you are unsure.
    negative: Make things up and sound certain.
  - name: Brevity
    positive: Keep answers short.
    negative: Pad answers with filler.""",
    "a thinking model, wrapped wording, a third principle": """\
<think>The user wants two. Principle 1: Positive: x Negative: y</think>
Principle 1 (Honesty):
Positive: Tell the truth,
and say when you are unsure.
Negative: Make things up and sound certain.
Principle 2 - Brevity
Positive: Keep answers short.
Negative: Pad answers with filler.
Principle 3: Extra
Positive: One more.
Negative: One less.""",
}


@pytest.mark.parametrize("text", WELL_FORMED.values(), ids=WELL_FORMED.keys())
def test_parser_reads_well_formed_answers(text):
    c = parse_principles(text, 2, name="cooking")
    assert c.name == "cooking"
    assert [(p.name, p.positive, p.negative) for p in c.principles] == [
        ("Honesty", "Tell the truth, and say when you are unsure.", "Make things up and sound certain."),
        ("Brevity", "Keep answers short.", "Pad answers with filler."),
    ]


def test_parser_names_unnamed_principles():
    c = parse_principles(
        "1. Positive: Be brief.\n   Negative: Be long.\n2. Positive: Be brief.\n   Negative: Ramble.", 2
    )
    assert [p.name for p in c.principles] == ["be brief", "be brief 2"]


BROKEN = {
    "empty": ("", "empty"),
    "prose": ("Principles are important for assistants to follow.", "found 0 complete principle(s)"),
    "one of two": (
        "Principle 1: a\nPositive: Be kind.\nNegative: Be rude.\nPrinciple 2: b\nPositive: Be brief.",
        "found 1 complete principle(s) with both wordings, need 2 (principle 2 has no negative",
    ),
    "placeholders": (
        "Principle 1: <short name>\nPositive: <the principle>\nNegative: <its antithesis>\n"
        "Principle 2: b\nPositive: Be brief.\nNegative: Be long.",
        "placeholder",
    ),
    "same wording": (
        "Principle 1: a\nPositive: Be kind.\nNegative: be kind\nPrinciple 2: b\nPositive: x.\nNegative: y.",
        "antithesis is the same",
    ),
    "truncated JSON": (
        '{"principles": [{"name": "a", "positive": "Be kind.", "negative": "Be rude."}, {"name": "b", "posi',
        "found 1 complete",
    ),  # the whole first object is recovered
}


@pytest.mark.parametrize("text, message", BROKEN.values(), ids=BROKEN.keys())
def test_parser_rejects_broken_answers_with_a_reason(text, message):
    with pytest.raises(DraftError) as err:
        parse_principles(text, 2)
    assert message in str(err.value)


GOOD = WELL_FORMED["the asked format"]


def scripted(answers):
    calls = []

    def complete(messages):
        calls.append(messages)
        return answers[min(len(calls) - 1, len(answers) - 1)]

    return complete, calls


def test_writer_retries_with_feedback_then_succeeds():
    complete, calls = scripted(["Here you go: be nice!", GOOD])
    seen = []
    c = draft_with(
        complete,
        "a cooking assistant",
        2,
        name="cooking",
        retries=2,
        on_attempt=lambda n, answer, error: seen.append((n, error)),
    )
    assert [p.name for p in c.principles] == ["Honesty", "Brevity"]
    assert len(calls) == 2 and seen[0][0] == 1 and "found 0 complete" in seen[0][1] and seen[1] == (2, None)
    assert "a cooking assistant" in calls[0][0]["content"] and "exactly 2 principles" in calls[0][0]["content"]
    retry = calls[1]
    assert retry[1] == {"role": "assistant", "content": "Here you go: be nice!"}
    assert "could not be used: found 0 complete" in retry[2]["content"]


def test_writer_gives_up_with_a_clear_error():
    complete, calls = scripted(["nonsense", "Principle 1: a\nPositive: Be kind.", "still nonsense"])
    with pytest.raises(SamiError) as err:
        draft_with(complete, "a cooking assistant", 2, retries=2)
    assert len(calls) == 3
    message = str(err.value)
    assert "after 3 tries" in message and "found 0 complete" in message and "\n" not in message


def test_write_command_saves_a_valid_constitution(tiny_model, tmp_path, monkeypatch, capsys):
    answers = iter(["garbage", GOOD])
    monkeypatch.setattr(writer, "model_completer", lambda *a, **k: lambda messages: next(answers))
    out = tmp_path / "cooking.yaml"
    code = main(
        ["write", "--task", "a cooking assistant", "--writer", str(tiny_model), "--principles", "2", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    c = load_constitution(out)
    assert c.name == "cooking" and [p.name for p in c.principles] == ["Honesty", "Brevity"]
    assert "answer 1 could not be read" in captured.err and "+ Keep answers short." in captured.out
    # An existing file is kept unless --force.
    code = main(["write", "--task", "x", "--writer", str(tiny_model), "--principles", "2", "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_write_command_with_a_real_tiny_model_fails_cleanly(tiny_model, tmp_path, capsys):
    out = tmp_path / "c.json"
    code = main(
        [
            "write",
            "--task",
            "a cooking assistant",
            "--writer",
            str(tiny_model),
            "--principles",
            "2",
            "--out",
            str(out),
            "--retries",
            "1",
            "--max-tokens",
            "8",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("error: the writer's answer could not be read as 2 principles after 2 tries")
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--principles", "0"], "--principles 0"),
        (["--task", "  "], "--task is empty"),
        (["--out", "{tmp}/c.txt"], ".yaml, .yml or .json"),
        (["--writer", "./missing/model"], "--writer ./missing/model: directory not found"),
    ],
)
def test_write_user_errors(tiny_model, tmp_path, capsys, flags, message):
    base = {
        "--task": "a cooking assistant",
        "--writer": str(tiny_model),
        "--principles": "2",
        "--out": str(tmp_path / "c.yaml"),
    }
    base.update(dict(zip(flags[::2], (f.replace("{tmp}", str(tmp_path)) for f in flags[1::2]))))
    code = main(["write", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
