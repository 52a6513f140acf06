"""Prompt templates with {constitution} and {query}, and turning prompts into token ids."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sami_mlx.errors import SamiError
from sami_mlx.fileio import read_text

PLACEHOLDERS = ("{constitution}", "{query}")
# dialogue/summarization set both prompts; the hh-*/tldr-* pairs follow the reference's split into a
# generation prompt (format example, a prior turn) and a plainer training prompt.
BUILTIN_TEMPLATES = (
    "dialogue",
    "summarization",
    "chat",
    "hh-generation",
    "hh-training",
    "tldr-generation",
    "tldr-training",
)
# "{{" and "}}" write literal braces; any other {...} on one line is a placeholder.
_FIELD = re.compile(r"\{\{|\}\}|\{[^{}\n]*\}")


def check_placeholders(text: str, allowed: Sequence[str], source: str, what: str = "template") -> None:
    """Refuse a placeholder that is not in `allowed` (a typo such as {qeury} would otherwise stay in
    every prompt as literal text), naming the file, the placeholder and the fix."""
    for m in _FIELD.finditer(text):
        field = m.group(0)
        if field in ("{{", "}}") or field in allowed:
            continue
        close = difflib.get_close_matches(field, allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise SamiError(
            f"{source}: {what} has an unknown placeholder {field}; {hint}the placeholders are "
            f"{', '.join(allowed)} (write {{{{ and }}}} for a literal brace)"
        )


def template_fields(text: str) -> list[str]:
    """The placeholders of a template in order, escapes ({{ }}) left out."""
    return [f for f in _FIELD.findall(text) if f not in ("{{", "}}")]


def fill_fields(text: str, values: dict[str, str]) -> str:
    """Substitute placeholders and unescape {{ }} in one pass, so filled-in text is never re-read."""

    def one(m: re.Match) -> str:
        field = m.group(0)
        if field in ("{{", "}}"):
            return field[0]
        return values.get(field, field)

    return _FIELD.sub(one, text)


@dataclass(frozen=True)
class Template:
    """A prompt template; `fill` substitutes the placeholders (user text may contain braces)."""

    text: str
    source: str = "template"

    def fill(self, constitution: str, query: str) -> str:
        # One pass over the template, so a query that contains "{constitution}" stays literal.
        return fill_fields(self.text, {"{constitution}": constitution, "{query}": query})


def load_template(source: str, required: tuple[str, ...] = PLACEHOLDERS) -> Template:
    """A built-in template by name (see BUILTIN_TEMPLATES) or a template file with each of the
    `required` placeholders once and no other placeholder."""
    if source in BUILTIN_TEMPLATES and not Path(source).exists():
        text = resources.files("sami_mlx.data.templates").joinpath(f"{source}.txt").read_text("utf-8")
    else:
        text = read_text(source, "template file")
    text = text.rstrip()
    check_placeholders(text, PLACEHOLDERS, source)
    fields = template_fields(text)
    for ph in PLACEHOLDERS:
        if ph not in fields and ph in required:
            raise SamiError(f"{source}: template has no {ph} placeholder; add it where the {ph[1:-1]} goes")
        if fields.count(ph) > 1:
            raise SamiError(f"{source}: template has {ph} more than once; keep one")
    return Template(text, source)


def encode_prompt(tokenizer, text: str, use_chat_template: bool | None) -> list[int]:
    """Token ids of a prompt, optionally wrapped as a user turn in the tokenizer's chat template (None, a
    setting left to auto and not resolved for the model, counts as off: sami_mlx.instruct resolves it)."""
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise SamiError(
                "--chat-template: this model's tokenizer has no chat template; drop the flag for base models"
            )
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_with_prefix(
    tokenizer, text: str, prefix: str, use_chat_template: bool | None
) -> tuple[list[int], list[int]]:
    """A generation prompt followed by a forced start of the response (the paper's TL;DR 'The post'):
    the prompt's ids and the prefix's ids, which the sampled response then begins with.

    The prefix is tokenized as it falls after the prompt, so the prompt plus prefix the model reads
    while sampling are exactly the tokens scored later; where that split is not clean (a merge across
    the boundary), the prefix is tokenized on its own.
    """
    head = encode_prompt(tokenizer, text, use_chat_template)
    if not prefix:
        return head, []
    whole = encode_prompt(tokenizer, text + prefix, use_chat_template) if not use_chat_template else None
    if whole is not None and whole[: len(head)] == head and len(whole) > len(head):
        return head, whole[len(head) :]
    return head, list(tokenizer.encode(prefix, add_special_tokens=False))
