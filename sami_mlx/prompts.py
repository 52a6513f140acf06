"""Prompt templates with {constitution} and {query}, and turning prompts into token ids."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import SamiError
from .fileio import read_text

PLACEHOLDERS = ("{constitution}", "{query}")
BUILTIN_TEMPLATES = ("dialogue", "summarization", "chat")


@dataclass(frozen=True)
class Template:
    """A prompt template; `fill` substitutes the placeholders (user text may contain braces)."""

    text: str
    source: str = "template"

    def fill(self, constitution: str, query: str) -> str:
        # One pass over the template, so a query that contains "{constitution}" stays literal.
        head, sep, tail = self.text.partition("{constitution}")
        return head.replace("{query}", query) + (constitution + tail.replace("{query}", query) if sep else "")


def load_template(source: str, required: tuple[str, ...] = PLACEHOLDERS) -> Template:
    """A built-in template by name ('dialogue', 'summarization', 'chat') or a template file
    with each of the `required` placeholders once."""
    if source in BUILTIN_TEMPLATES and not Path(source).exists():
        text = resources.files("sami_mlx.data.templates").joinpath(f"{source}.txt").read_text("utf-8")
    else:
        text = read_text(source, "template file")
    text = text.rstrip()
    for ph in PLACEHOLDERS:
        if ph not in text and ph in required:
            raise SamiError(f"{source}: template has no {ph} placeholder; add it where the {ph[1:-1]} goes")
        if text.count(ph) > 1:
            raise SamiError(f"{source}: template has {ph} more than once; keep one")
    return Template(text, source)


def encode_prompt(tokenizer, text: str, use_chat_template: bool) -> list[int]:
    """Token ids of a prompt, optionally wrapped as a user turn in the tokenizer's chat template."""
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise SamiError(
                "--chat-template: this model's tokenizer has no chat template; drop the flag for base models"
            )
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    return list(tokenizer.encode(text))
