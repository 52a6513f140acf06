"""Chat prompts and streamed replies for the Chat screen (plain Python: no Textual here)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

from sami_mlx.checkpoints import Checkpoint, load_checkpoint_model
from sami_mlx.config import TrainConfig, config_from_file
from sami_mlx.errors import SamiError
from sami_mlx.inputs.prompts import load_template
from sami_mlx.loop.adapters import adapters_disabled

STOP_STRINGS = tuple(TrainConfig().stop)  # the engine's defaults: "Human:", "###"


def build_prompt(
    tokenizer,
    turns: Sequence[dict],
    constitution: str | None,
    template: str | None = None,
    chat_template: bool | None = None,
) -> list[int]:
    """Token ids for the conversation so far (ending with a user turn), with the constitution or not.

    Prompts follow the run's settings when there is a run (its generation template, its
    `chat_template`); otherwise the tokenizer's chat template when it has one, with the built-in
    'chat' template, else the 'dialogue' transcript. The constitution goes in the first turn.
    """
    use_chat = uses_chat_template(tokenizer, chat_template)
    fill = load_template(template or ("chat" if use_chat else "dialogue")).fill
    first, *rest = turns
    if use_chat:
        messages = [dict(t) for t in turns]
        if constitution:
            messages[0]["content"] = fill(constitution, first["content"])
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    text = fill(constitution, first["content"]) if constitution else f"Human: {first['content']}\n\nAssistant:"
    for t in rest:
        text += f" {t['content']}" if t["role"] == "assistant" else f"\n\nHuman: {t['content']}\n\nAssistant:"
    return list(tokenizer.encode(text))


def uses_chat_template(tokenizer, chat_template: bool | None) -> bool:
    """Whether prompts go through the tokenizer's chat template (None: when it has one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise SamiError("this run used --chat-template but the model's tokenizer has none")
    return has_template if chat_template is None else chat_template


def stream_reply(
    model,
    tokenizer,
    prompt: list[int],
    max_tokens: int,
    temperature: float,
    should_stop: Callable[[], bool] = lambda: False,
    stop_strings: Sequence[str] = STOP_STRINGS,
) -> Iterator[str]:
    """The reply so far, after every new token, cut before a stop string."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    text = ""
    for response in mlx_lm.stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=temperature)
    ):
        text += response.text
        hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
        if hits:
            yield text[: min(hits)].rstrip()
            return
        yield text
        if should_stop():
            return


class ChatModels:
    """The one model the chat holds, loaded for a checkpoint; a lock keeps generations apart."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.model = self.tokenizer = None
        self.lock = threading.Lock()

    def load(self, model: str, checkpoint: Checkpoint):
        """(model, tokenizer) with the checkpoint's adapters, reusing the loaded one when it matches."""
        key = (model, str(checkpoint.adapter_path or ""))
        if key != self.key:
            self.model = self.tokenizer = self.key = None  # free the old weights before loading
            self.model, self.tokenizer = load_checkpoint_model(model, checkpoint)
            import mlx.core as mx

            # Materialise every weight now: the loading thread's streams are gone when it ends.
            mx.eval(self.model.parameters())
            self.key = key
        return self.model, self.tokenizer

    def base_of(self, checkpoint: Checkpoint):
        """A context in which the loaded model runs as the base model (adapters switched off)."""
        return adapters_disabled(self.model) if checkpoint.adapter_path else nullcontext()


def run_prompt_settings(run_dir: str | None) -> dict:
    """How the run's prompts were built (template, chat template, stop strings), to chat the same way."""
    if not run_dir:
        return {"template": None, "chat_template": None, "stop": STOP_STRINGS}
    cfg = config_from_file(str(Path(run_dir).expanduser() / "config.yaml"))
    return {
        "template": cfg.get("generation_template") or cfg.get("template"),
        "chat_template": bool(cfg.get("chat_template", False)),
        "stop": tuple(cfg.get("stop", STOP_STRINGS)),
    }


def checkpoint_label(checkpoint: Checkpoint) -> str:
    return "base model" if checkpoint.adapter_path is None else f"{checkpoint.name} (aligned)"


def model_name(model: str) -> str:
    """A short model name for labels: the directory or repo name."""
    return Path(model).name or model
