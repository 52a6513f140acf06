"""A chat session with the base model or a checkpoint: prompts, stop strings, commands; shared by
`sami-mlx chat` (sami_mlx.cli.chat) and the terminal UI.

With a chat template (instruct models) the turns are messages and the constitution goes into the
first user turn through the run's template (the built-in 'chat' one by default), as training saw it.
Without one the conversation is written as a Human/Assistant dialogue after the run's template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sami_mlx.checkpoints import (
    Checkpoint,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint_model,
)
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import Constitution
from sami_mlx.inputs.prompts import Template, load_template

HELP = """\
commands:
  /checkpoint [N|iter-NN|base]  switch model; without an argument, list the checkpoints
  /constitution [on|off]        put the constitution in the prompt, or leave it out (toggles)
  /reset                        forget the conversation
  /help                         this help
  /quit                         leave (also /exit, Ctrl-D)"""
DEFAULT_STOP = ("Human:", "###")


class StopFilter:
    """Passes streamed text through, holding back just enough to cut before a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer, self.text, self.stopped = "", "", False

    def feed(self, segment: str) -> str:
        """The part of the text so far that is safe to show."""
        if self.stopped:
            return ""
        self.buffer += segment
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[: min(hits)], "", True
        else:
            cut = max(len(self.buffer) - self.hold, 0)
            out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        self.text += out
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        self.text += out
        return out


@dataclass
class ChatSession:
    """The model, the conversation so far, and the settings the commands change."""

    model_name: str
    run_dir: str | None = None
    constitution: Constitution | None = None
    template: str | None = None  # None: the run's generation template, else a built-in by mode
    chat_template: bool | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = DEFAULT_STOP
    trust_remote_code: bool = False
    use_constitution: bool = True
    history: list[tuple[str, str]] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    run_template: str | None = None  # the run's generation template
    run_chat_template: bool = False  # whether the run trained through the chat template

    def load(self, checkpoint: Checkpoint) -> None:
        """Load the model with this checkpoint's adapters (or none for base)."""
        self.model, self.tokenizer = load_checkpoint_model(self.model_name, checkpoint, self.trust_remote_code)
        self.checkpoint = checkpoint
        has = bool(getattr(self.tokenizer, "chat_template", None))
        if self.chat_template and not has:
            raise SamiError("--chat-template: this model's tokenizer has no chat template; drop the flag")
        wanted = self.chat_template
        if wanted is None:  # as the run trained; without a run, whenever the tokenizer has one
            wanted = self.run_chat_template if self.run_template else has
        self.uses_chat_template = wanted
        self._template = self._pick_template()
        self.context = _context_length(self.model_name)

    def _pick_template(self) -> Template:
        if self.template:
            return load_template(self.template)
        if self.run_template and self.run_chat_template == self.uses_chat_template:
            return load_template(self.run_template)
        return load_template("chat" if self.uses_chat_template else "dialogue")

    @property
    def status(self) -> str:
        name = self.checkpoint.name if self.checkpoint else "?"
        c = "on" if self.constitution and self.use_constitution else "off"
        fmt = "chat template" if self.uses_chat_template else "plain dialogue"
        return f"[{self.model_name} · {name} · constitution {c} · {fmt}]"

    # ---- prompts ---------------------------------------------------------------------------

    def prompt_ids(self, message: str) -> list[int]:
        """Token ids of the conversation plus `message`, dropping the oldest turns to fit the context."""
        history = list(self.history)
        while True:
            ids = self._encode(history, message)
            if not history or not self.context or len(ids) + self.max_tokens <= self.context:
                return ids
            history.pop(0)

    def _first_turn(self, text: str) -> str:
        if self.constitution and self.use_constitution:
            rendered = self.constitution.render(self.constitution.positive_variant)
            return self._template.fill(rendered, text)
        return text if self.uses_chat_template else f"Human: {text}\n\nAssistant:"

    def _encode(self, history: list[tuple[str, str]], message: str) -> list[int]:
        turns = [*history, (message, None)]
        if self.uses_chat_template:
            messages = []
            for n, (user, reply) in enumerate(turns):
                messages.append({"role": "user", "content": self._first_turn(user) if n == 0 else user})
                if reply is not None:
                    messages.append({"role": "assistant", "content": reply})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        text = self._first_turn(turns[0][0])
        for (_, reply), (user, _) in zip(turns, turns[1:]):
            text += f" {reply}\n\nHuman: {user}\n\nAssistant:"
        return list(self.tokenizer.encode(text))

    # ---- replies ---------------------------------------------------------------------------

    def reply(self, message: str, write: Callable[[str], None]) -> str:
        """Stream the model's reply to `message` through `write`, and remember the turn."""
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        ids = self.prompt_ids(message)
        stops = [] if self.uses_chat_template else list(self.stop)
        flt = StopFilter(stops)
        sampler = make_sampler(temp=self.temperature, top_p=self.top_p)
        try:
            for response in stream_generate(
                self.model, self.tokenizer, ids, max_tokens=self.max_tokens, sampler=sampler
            ):
                shown = flt.feed(response.text)
                if shown:
                    write(shown)
                if flt.stopped:
                    break
        except KeyboardInterrupt:
            write(" [interrupted]")
        rest = flt.flush()
        if rest:
            write(rest)
        text = flt.text.strip()
        self.history.append((message, text))
        return text

    # ---- commands --------------------------------------------------------------------------

    def command(self, line: str, say: Callable[[str], None]) -> bool:
        """Run a /command; False when the user asked to quit."""
        name, _, arg = line[1:].strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name in ("help", "h", "?"):
            say(HELP)
        elif name == "reset":
            self.history.clear()
            say("[conversation reset]")
        elif name in ("constitution", "c"):
            self.toggle_constitution(arg, say)
        elif name in ("checkpoint", "checkpoints", "ckpt", "switch"):
            self.switch(arg, say)
        else:
            say(f"[unknown command /{name}; /help lists them]")
        return True

    def toggle_constitution(self, arg: str, say: Callable[[str], None]) -> None:
        if self.constitution is None:
            say("[no constitution loaded; start with --constitution FILE or --run RUN]")
            return
        if arg.lower() in ("on", "off"):
            self.use_constitution = arg.lower() == "on"
        elif arg:
            say("[use /constitution, /constitution on or /constitution off]")
            return
        else:
            self.use_constitution = not self.use_constitution
        say(f"[constitution {'on' if self.use_constitution else 'off'}: {self.constitution.name}]")

    def switch(self, arg: str, say: Callable[[str], None]) -> None:
        checkpoints = list_checkpoints(self.run_dir)
        if not arg:
            current = self.checkpoint.name if self.checkpoint else ""
            say(
                "checkpoints: "
                + ", ".join(f"*{c.name}" if c.name == current else c.name for c in checkpoints)
                + ("" if self.run_dir else " (no --run given)")
            )
            return
        try:
            chosen = find_checkpoint(self.run_dir, arg)
        except SamiError as e:
            say(f"[{e}]")
            return
        say(f"[loading {chosen.name}...]")
        try:
            self.load(chosen)
        except SamiError as e:
            say(f"[{e}]")
            return
        say(self.status)


def _context_length(model_name: str) -> int | None:
    from sami_mlx.model import resolve_model_path

    try:
        config = json.loads((resolve_model_path(model_name) / "config.json").read_text())
    except (OSError, ValueError, SamiError):
        return None
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None
