"""`sami-mlx chat`: prompts with and without the chat template, streaming, commands, a real terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sami_mlx.chat import ChatSession, PromptFormat, PromptStyle, StopFilter
from sami_mlx.checkpoints import find_checkpoint
from sami_mlx.cli.main import main
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import load_constitution


@pytest.fixture(scope="module")
def tiny_run(trained_run) -> Path:
    return trained_run(iterations=2)


def session_for(tiny_model, tiny_run, **kw) -> ChatSession:
    s = ChatSession(str(tiny_model), constitution=load_constitution(tiny_run / "constitution.yaml"), max_tokens=8, **kw)
    s.load(find_checkpoint(None, "base"))
    return s


def test_stop_filter_cuts_before_a_stop_string_across_segments():
    f = StopFilter(["Human:"])
    shown = [f.feed(s) for s in ["Hel", "lo th", "ere.\n\nHu", "man: next", "more"]]
    assert "".join(shown) == "Hello there.\n\n" and f.stopped and f.text == "Hello there.\n\n"
    g = StopFilter(["Human:"])
    assert "".join(g.feed(s) for s in ["no ", "stop ", "here"]) + g.flush() == "no stop here"


def test_prompts_follow_the_run_and_carry_the_constitution(tiny_model):
    """The prompt format the REPL and the terminal UI share: the run's template and mode, or the defaults."""
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(tiny_model))
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    run = PromptFormat.choose(tokenizer, PromptStyle("dialogue", chat_template=False))
    assert not run.chat and run.stop == ("Human:", "###")
    plain = tokenizer.decode(run.encode(tokenizer, turns, "1. Be brief."))
    assert "Assistant constitution:\n1. Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye" in plain
    assert plain.endswith("Assistant:")
    without = tokenizer.decode(run.encode(tokenizer, turns[:1], None))
    assert "Be brief" not in without and without.endswith("Human: Hi\n\nAssistant:")
    default = PromptFormat.choose(tokenizer)  # no run: the tokenizer's chat template, no stop strings
    assert default.chat and default.stop == ()
    chat = tokenizer.decode(default.encode(tokenizer, turns[:1], "1. Be brief."))
    assert chat.startswith("<|user|>") and "1. Be brief." in chat and chat.endswith("<|assistant|>")
    # The run trained through the chat template, and --no-chat-template overrides: the built-in dialogue.
    flagged = PromptFormat.choose(tokenizer, PromptStyle("chat", chat_template=True), chat_template=False)
    assert (
        not flagged.chat
        and flagged.template.text == PromptFormat.choose(tokenizer, PromptStyle("dialogue")).template.text
    )


def test_a_chat_template_the_tokenizer_lacks_is_refused(tiny_model):
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(tiny_model))
    tokenizer.chat_template = None
    with pytest.raises(SamiError, match="--chat-template: this model's tokenizer has no chat template"):
        PromptFormat.choose(tokenizer, chat_template=True)
    with pytest.raises(SamiError, match="this run used --chat-template"):
        PromptFormat.choose(tokenizer, PromptStyle("chat", chat_template=True))
    assert not PromptFormat.choose(tokenizer).chat


def test_chat_template_prompt_with_the_constitution_toggled(tiny_model, tiny_run):
    s = session_for(tiny_model, tiny_run)
    assert s.uses_chat_template  # the tiny tokenizer has one and no run says otherwise
    decode = s.tokenizer.decode
    first = decode(s.prompt_ids("How do I bake bread?"))
    assert first.count("<|user|>") == 1 and first.endswith("<|assistant|>")
    assert "1. Be brief.\n2. Be kind." in first and "How do I bake bread?" in first
    says = []
    s.toggle_constitution("", says.append)
    assert says == ["[constitution off: test]"]
    assert "Be brief." not in decode(s.prompt_ids("How do I bake bread?"))
    s.toggle_constitution("on", says.append)
    s.history.append(("How do I bake bread?", "Knead it."))
    second = decode(s.prompt_ids("And then?"))
    assert second.count("<|user|>") == 2 and "<|assistant|>Knead it.</s>" in second
    assert second.index("Be brief.") < second.index("Knead it.") < second.index("And then?")


def test_plain_dialogue_without_the_chat_template(tiny_model, tiny_run):
    s = session_for(tiny_model, tiny_run, chat_template=False)
    s.history.append(("Hi!", "Hello."))
    text = s.tokenizer.decode(s.prompt_ids("Tell me a story."))
    assert "Assistant constitution:\n1. Be brief.\n2. Be kind.\n\nHuman: Hi!\n\nAssistant: Hello." in text
    assert text.endswith("Human: Tell me a story.\n\nAssistant:")
    s.use_constitution = False
    assert s.tokenizer.decode(s.prompt_ids("Tell me a story.")).endswith(
        "Human: Hi!\n\nAssistant: Hello.\n\nHuman: Tell me a story.\n\nAssistant:"
    )


def test_old_turns_are_dropped_to_fit_the_context(tiny_model, tiny_run):
    s = session_for(tiny_model, tiny_run)
    s.history = [(f"question {i} " * 5, f"answer {i} " * 5) for i in range(12)]
    s.context = None
    full = len(s.prompt_ids("last"))
    s.context = full // 2
    ids = s.prompt_ids("last")
    assert len(ids) + s.max_tokens <= s.context
    text = s.tokenizer.decode(ids)
    assert "question 0" not in text and "question 11" in text and "Be brief." in text


def test_replies_stream_and_are_remembered(tiny_model, tiny_run):
    s = session_for(tiny_model, tiny_run)
    chunks = []
    reply = s.reply("How do I bake bread?", chunks.append)
    assert len([c for c in chunks if c]) >= 2  # token by token, not one block at the end
    assert "".join(chunks).strip() == reply and s.history == [("How do I bake bread?", reply)]


def test_commands_switch_checkpoint_reset_and_quit(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(
        sys,
        "stdin",
        io.StringIO(
            "hello\n/checkpoint\n/checkpoint 1\nhi again\n/checkpoint 9\n/constitution off\n"
            "/reset\n/nope\n/quit\nnever answered\n"
        ),
    )
    code = main(["chat", "--run", str(tiny_run / "run"), "--max-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = err.splitlines()
    assert "iter-02 · constitution on · plain dialogue]" in lines[0]  # the run trained without the chat template
    assert "checkpoints: base, iter-01, *iter-02" in err
    assert "[loading iter-01...]" in err and "iter-01 · constitution on" in err
    assert "--iteration 9: no such checkpoint" in err
    assert "[constitution off: test]" in err and "[conversation reset]" in err and "unknown command /nope" in err
    assert out.count("\n") == 2  # two replies; the line after /quit was never read


def test_chat_user_errors(tiny_model, capsys):
    assert main(["chat"]) == 2 and "--model is required" in capsys.readouterr().err
    assert main(["chat", "--model", str(tiny_model), "--iteration", "2"]) == 2
    assert "--iteration needs --run" in capsys.readouterr().err
    for flags, message in (
        (["--temperature", "11"], "--temperature 11.0: must be between 0 and 10"),
        (["--top-p", "0"], "--top-p 0.0: must be above 0 and at most 1"),
        (["--max-tokens", "0"], "--max-tokens 0: must be at least 1"),
    ):
        assert main(["chat", "--model", str(tiny_model), *flags]) == 2
        assert message in capsys.readouterr().err


def test_a_run_without_a_readable_config_is_refused_naming_the_file(tmp_path, capsys):
    from sami_mlx.config_file import load_run_config

    assert main(["chat", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--run {tmp_path}: no config.yaml there; pass a run directory made by `sami-mlx train`" in err
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    assert main(["chat", "--run", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.yaml'}: invalid YAML" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("steps: 2\n")
    with pytest.raises(SamiError, match="config.yaml: no 'model' setting"):
        load_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("model: m\nsteps: 2\nchat_template: true\n")
    cfg = load_run_config(tmp_path)
    assert cfg.model == "m" and cfg.steps == 2 and PromptStyle.of_config(cfg).chat_template is True


def test_chat_in_a_pseudo_terminal(tiny_run):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sami_mlx", "chat", "--run", str(tiny_run / "run"), "--max-tokens", "4"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
        env=dict(os.environ, TERM="dumb"),
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60) -> bytes:
        nonlocal seen
        start, deadline = len(seen), time.monotonic() + timeout
        while marker not in seen[start:]:
            ready, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"no {marker!r} in time; terminal showed {seen[-500:]!r}")
            try:
                seen += os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
        return seen[start:]

    try:
        read_until(b">>> ")
        os.write(master, b"hello there\n")
        read_until(b">>> ")
        os.write(master, b"/checkpoint base\n")
        assert b"base \xc2\xb7 constitution on" in read_until(b">>> ")
        os.write(master, b"/constitution\n")
        assert b"[constitution off: test]" in read_until(b">>> ")
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
