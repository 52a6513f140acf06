"""Chatting with the base model or a checkpoint: prompts, stop strings, template choice, streamed
replies, and the session behind `sami-mlx chat` (sami_mlx.cli.chat). The terminal UI's chat screen
builds its prompts and streams its replies with the same functions.

With a chat template (instruct models) the turns are messages and the constitution goes into the
first user turn through the run's template (the built-in 'chat' one by default), as training saw it.
Without one the conversation is written as a Human/Assistant dialogue after the run's template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from sami_mlx.checkpoints import (
    Checkpoint,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint_model,
)
from sami_mlx.config import TrainConfig
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
DEFAULT_STOP = tuple(TrainConfig().stop)  # the engine's defaults: "Human:", "###"


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


@dataclass(frozen=True)
class PromptStyle:
    """How a run wrote its prompts, so that chat writes them the same way; without a run, the defaults."""

    template: str | None = None  # the run's generation template (None: a built-in by mode)
    chat_template: bool | None = None  # whether the run used the chat template (None: when the tokenizer has one)
    stop: tuple[str, ...] = DEFAULT_STOP

    @classmethod
    def of_config(cls, cfg: TrainConfig) -> PromptStyle:
        return cls(cfg.generation_template or cfg.template, bool(cfg.chat_template), tuple(cfg.stop))


@dataclass(frozen=True)
class PromptFormat:
    """How prompts for one tokenizer are written: through its chat template or as a plain dialogue, after
    which template, and the stop strings that end a reply (none with a chat template: EOS does)."""

    chat: bool
    template: Template
    stop: tuple[str, ...]

    @classmethod
    def choose(
        cls,
        tokenizer,
        style: PromptStyle = PromptStyle(),
        template: str | None = None,
        chat_template: bool | None = None,
    ) -> PromptFormat:
        """The format for `tokenizer`: `template` and `chat_template` (the flags) override the style."""
        if chat_template is not None:
            refuse = "--chat-template: this model's tokenizer has no chat template; drop the flag"
            chat = use_chat_template(tokenizer, chat_template, refuse)
        else:
            refuse = "this run used --chat-template but the model's tokenizer has none; chat with the run's model"
            chat = use_chat_template(tokenizer, style.chat_template, refuse)
        if template:
            chosen = load_template(template)
        elif style.template and (style.chat_template is None or style.chat_template == chat):
            chosen = load_template(style.template)
        else:
            chosen = load_template("chat" if chat else "dialogue")
        return cls(chat, chosen, () if chat else tuple(style.stop))

    def encode(self, tokenizer, turns: Sequence[dict], constitution: str | None, limit: int | None = None) -> list[int]:
        """Token ids for the conversation so far (role/content messages ending with a user turn), the
        constitution in the first turn; the oldest exchanges are dropped to keep it to `limit` tokens."""
        turns = list(turns)
        while True:
            ids = self._encode(tokenizer, turns, constitution)
            if limit is None or len(ids) <= limit or len(turns) <= 1:
                return ids
            turns = turns[2:]  # one user turn and its reply

    def _encode(self, tokenizer, turns: list[dict], constitution: str | None) -> list[int]:
        first, *rest = turns
        if self.chat:
            messages = [dict(t) for t in turns]
            if constitution:
                messages[0]["content"] = self.template.fill(constitution, first["content"])
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tokenizer.encode(text, add_special_tokens=False))
        if constitution:
            text = self.template.fill(constitution, first["content"])
        else:
            text = f"Human: {first['content']}\n\nAssistant:"
        for t in rest:
            text += f" {t['content']}" if t["role"] == "assistant" else f"\n\nHuman: {t['content']}\n\nAssistant:"
        return list(tokenizer.encode(text))

    def stop_filter(self) -> StopFilter:
        return StopFilter(self.stop)


def use_chat_template(tokenizer, wanted: bool | None, refuse: str) -> bool:
    """Whether prompts go through the tokenizer's chat template: as `wanted`, or when it has one (None);
    `refuse` is the error when it is wanted and the tokenizer has none."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if wanted and not has:
        raise SamiError(refuse)
    return has if wanted is None else wanted


def constitution_text(constitution: Constitution | None) -> str | None:
    """What a chat prompt carries: the constitution's all-positive wording, numbered."""
    return constitution.render(constitution.positive_variant) if constitution else None


def stream_reply(
    model,
    tokenizer,
    prompt: list[int],
    stop_filter: StopFilter,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """Stream a reply as the pieces that are safe to show (`stop_filter` cuts before a stop string and
    keeps the text so far); ends at EOS, `max_tokens`, a stop string, or when `should_stop()`."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=temperature, top_p=top_p)
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler):
        shown = stop_filter.feed(response.text)
        if shown:
            yield shown
        if stop_filter.stopped or should_stop():
            break
    rest = stop_filter.flush()
    if rest:
        yield rest


@dataclass
class ChatSession:
    """The model, the conversation so far, and the settings the commands change."""

    model_name: str
    run_dir: str | None = None
    constitution: Constitution | None = None
    template: str | None = None  # None: the run's generation template, else a built-in by mode
    chat_template: bool | None = None  # None: as the run trained (without a run, when the tokenizer has one)
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    style: PromptStyle = field(default_factory=PromptStyle)  # how the run wrote its prompts
    trust_remote_code: bool = False
    use_constitution: bool = True
    history: list[tuple[str, str]] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    dequantize: str = "auto"  # --dequantize for a quantized base (the run's setting)
    load_note: str = ""  # how the last load left the weights when not as stored (dequantized, and why)

    def load(self, checkpoint: Checkpoint) -> None:
        """Load the model with this checkpoint's adapters (or none for base)."""
        notes: list[str] = []
        self.model, self.tokenizer = load_checkpoint_model(
            self.model_name, checkpoint, self.trust_remote_code, self.dequantize, notes.append
        )
        self.load_note = "; ".join(notes)
        self.checkpoint = checkpoint
        self.format = PromptFormat.choose(self.tokenizer, self.style, self.template, self.chat_template)
        self.context = context_length(self.model_name)

    @property
    def uses_chat_template(self) -> bool:
        return self.format.chat

    @property
    def status(self) -> str:
        name = self.checkpoint.name if self.checkpoint else "?"
        c = "on" if self.constitution and self.use_constitution else "off"
        fmt = "chat template" if self.uses_chat_template else "plain dialogue"
        return f"[{self.model_name} · {name} · constitution {c} · {fmt}]"

    # ---- prompts ---------------------------------------------------------------------------

    def prompt_ids(self, message: str) -> list[int]:
        """Token ids of the conversation plus `message`, dropping the oldest turns to fit the context."""
        turns = []
        for user, reply in self.history:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        turns.append({"role": "user", "content": message})
        constitution = constitution_text(self.constitution) if self.use_constitution else None
        limit = self.context - self.max_tokens if self.context else None
        return self.format.encode(self.tokenizer, turns, constitution, limit)

    # ---- replies ---------------------------------------------------------------------------

    def reply(self, message: str, write: Callable[[str], None]) -> str:
        """Stream the model's reply to `message` through `write`, and remember the turn."""
        ids = self.prompt_ids(message)
        flt = self.format.stop_filter()
        try:
            for shown in stream_reply(
                self.model, self.tokenizer, ids, flt, self.max_tokens, self.temperature, self.top_p
            ):
                write(shown)
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


def context_length(model_name: str) -> int | None:
    """The model's context length in tokens (max_position_embeddings), or None when unknown."""
    from sami_mlx.model import resolve_model_path

    try:
        config = json.loads((resolve_model_path(model_name) / "config.json").read_text())
    except (OSError, ValueError, SamiError):
        return None
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None
