"""Instruct models by default: whether `--model` is an instruct model, and the prompt settings left to
auto (`chat_template` and `template` None) chosen for it.

The rule, documented in docs/TRAINING.md and `sami-mlx train --help`:

- a preset (models/*.yaml), or a hub id a preset names, is what its `kind` says;
- any other model (a directory, a GGUF file, a hub id) is instruct when its name says so: the
  directory, file or repository name has the word `instruct`, `chat` or `it` (words split at anything
  but letters and digits: `SmolLM2-135M-Instruct.Q4_1.gguf`, `Llama-2-7b-chat-hf`, `gemma-2-2b-it`);
- an instruct model gets the chat template only when its tokenizer carries one (tokenizer_config.json's
  `chat_template`, or a chat_template.jinja file); the template then defaults to the built-in `chat`.

Everything else keeps the defaults of a base model: plain prompts and the `dialogue` template. The
user's own `--chat-template` / `--no-chat-template` and `--template` always win, and a run records the
values chosen in its config.yaml, so that resume, chat, eval and serve read what ran.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sami_mlx.config import TrainConfig

INSTRUCT_WORDS = ("instruct", "chat", "it")
CHAT_TEMPLATE_DEFAULT = "chat"  # the built-in template (sami_mlx/data/templates/chat.txt)
PLAIN_TEMPLATE_DEFAULT = "dialogue"


@dataclass(frozen=True)
class ModelKind:
    """Whether a model is an instruct model, and the reason in words (for the dry run)."""

    instruct: bool
    why: str


@dataclass(frozen=True)
class PromptChoice:
    """The prompt settings a run uses, and for each one left to auto why it was chosen ('' when given)."""

    chat_template: bool
    template: str
    chat_template_why: str = ""
    template_why: str = ""


def has_chat_template(tokenizer: Any) -> bool | None:
    """Whether a loaded tokenizer carries a chat template; None when there is no tokenizer to ask."""
    if tokenizer is None:
        return None
    return bool(getattr(tokenizer, "chat_template", None))


def model_name(model: str) -> str:
    """The name `model` goes by: a hub repository's name, a directory's or a file's (a snapshot in the
    Hugging Face cache goes by its repository's name, not its commit)."""
    path = Path(model).expanduser()
    parts = path.parts
    if "snapshots" in parts[:-1]:
        repo = parts[parts.index("snapshots") - 1] if parts.index("snapshots") > 0 else ""
        if repo.startswith("models--"):
            return repo.split("--")[-1]
    return path.name or model


def name_says_instruct(model: str) -> bool:
    """Whether `model`'s name has one of INSTRUCT_WORDS as a word."""
    words = re.split(r"[^a-z0-9]+", model_name(model).lower())
    return any(w in INSTRUCT_WORDS for w in words)


def model_kind(model: str, chat_template: bool | None = None) -> ModelKind:
    """Whether `--model` is an instruct model by the module's rule; `chat_template`: whether its tokenizer
    carries one (None: not known yet, as in a dry run before the download)."""
    from sami_mlx.presets import get_preset, list_presets, preset_names

    preset = None
    if model in preset_names():
        preset = get_preset(model)
    else:
        preset = next((p for p in list_presets() if p.hub_id and p.hub_id == model), None)
    if preset is not None:
        said, source = preset.kind == "instruct", f"preset {preset.name} is of kind {preset.kind}"
    else:
        said = name_says_instruct(model)
        words = "/".join(INSTRUCT_WORDS)
        source = f"its name {model_name(model)!r} " + ("says instruct" if said else f"has no word {words}")
    if not said:
        return ModelKind(False, source)
    if chat_template is False:
        return ModelKind(False, f"{source}, but its tokenizer has no chat template")
    if chat_template is None:
        return ModelKind(True, f"{source}; its tokenizer is not on this machine yet, so a chat template is assumed")
    return ModelKind(True, f"{source} and its tokenizer has a chat template")


def choose_prompts(model: str, chat_template: bool | None, template: str | None, tokenizer: Any = None) -> PromptChoice:
    """The prompt settings for `model`: the given ones, and for those left to auto (None) the instruct
    model's (the chat template, the `chat` template) or the base model's (plain, `dialogue`)."""
    template = None if template == "auto" else template
    chat_why = template_why = ""
    if chat_template is None:
        kind = model_kind(model, has_chat_template(tokenizer))
        chat_template = kind.instruct
        chat_why = f"{'an instruct' if kind.instruct else 'a base'} model: {kind.why}"
    if template is None:
        template = CHAT_TEMPLATE_DEFAULT if chat_template else PLAIN_TEMPLATE_DEFAULT
        template_why = "the prompt for a chat template" if chat_template else "the prompt for plain text"
    return PromptChoice(chat_template, template, chat_why, template_why)


def resolve_prompts(cfg: TrainConfig, tokenizer: Any = None) -> TrainConfig:
    """`cfg` with `chat_template` and `template` chosen where left to auto (None), and the generation and
    training templates that follow from them; `tokenizer`: the loaded model's, which settings left to auto
    are checked against (without one they are decided from the model's preset or name alone)."""
    choice = choose_prompts(cfg.model, cfg.chat_template, cfg.template, tokenizer)
    return dataclasses.replace(
        cfg,
        chat_template=choice.chat_template,
        template=choice.template,
        generation_template=cfg.generation_template or choice.template,
        training_template=cfg.training_template or choice.template,
    )


def prompts_resolved(cfg: TrainConfig) -> bool:
    """Whether nothing about the prompts is left to auto."""
    return cfg.chat_template is not None and cfg.template not in (None, "auto")
