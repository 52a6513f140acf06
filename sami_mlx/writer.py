"""The principle writer: an instruct model drafts K principles and their antitheses for a task.

Small models answer loosely, so the parser reads JSON, YAML-like and labelled-line answers,
with or without Markdown, and the writer retries (showing the model what was wrong) before
giving up with a clear error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import Constitution, constitution_from_dict

Messages = list[dict]
Complete = Callable[[Messages], str]

WRITER_PROMPT = """\
Write a constitution for an AI assistant: a short list of principles it should follow in this task.

Task: {task}

Write exactly {k} principles. For each one give a short name, the principle itself (one sentence \
telling the assistant what to do), and its antithesis (one sentence telling it to do the opposite, \
worded the same way).

Use exactly this format and nothing else:

Principle 1: <short name>
Positive: <the principle>
Negative: <its antithesis>

Principle 2: <short name>
Positive: <the principle>
Negative: <its antithesis>

...and so on up to Principle {k}."""

RETRY_PROMPT = """\
That answer could not be used: {reason}. Write exactly {k} principles again, each as three lines \
"Principle N: <short name>", "Positive: <the principle>", "Negative: <its antithesis>", and nothing else."""

PLAIN_PRIMER = "Principle 1:"  # a base model continues the format more reliably once it is started
MAX_WORDING = 400
POSITIVE_KEYS = ("positive", "principle", "wording", "statement", "thesis", "do", "rule")
NEGATIVE_KEYS = ("negative", "antithesis", "opposite", "anti", "counter", "contrary", "dont", "don't", "inverse")
NAME_KEYS = ("name", "title", "short_name", "label", "id")


class DraftError(ValueError):
    """A writer's answer that does not hold the principles asked for; the message says what is wrong."""


@dataclass
class _Entry:
    name: str = ""
    positive: str = ""
    negative: str = ""
    last: str = ""  # the field a continuation line extends


# ---- parsing -----------------------------------------------------------------------------------


def parse_principles(text: str, k: int, name: str = "constitution") -> Constitution:
    """Read exactly `k` principles (extra ones are dropped) from a model's answer; raises DraftError."""
    text = _clean(text)
    if not text:
        raise DraftError("the answer was empty")
    entries = _from_json(text)
    if entries is None:
        entries = _from_lines(text)
    complete = [e for e in entries if e.positive and e.negative]
    if len(complete) < k:
        missing = [
            f"principle {i} has no {'positive' if not e.positive else 'negative'} wording"
            for i, e in enumerate(entries, start=1)
            if not (e.positive and e.negative)
        ]
        detail = f" ({'; '.join(missing[:2])})" if missing else ""
        raise DraftError(f"found {len(complete)} complete principle(s) with both wordings, need {k}{detail}")
    chosen = complete[:k]
    for i, e in enumerate(chosen, start=1):
        for label, wording in (("positive", e.positive), ("negative", e.negative)):
            if re.search(r"<[^<>]{3,40}>", wording):
                raise DraftError(f"principle {i}'s {label} wording is the format's placeholder ({wording[:60]!r})")
            if len(wording) > MAX_WORDING:
                raise DraftError(
                    f"principle {i}'s {label} wording is {len(wording)} characters; keep it to one sentence"
                )
        if _norm(e.positive) == _norm(e.negative):
            raise DraftError(f"principle {i}'s antithesis is the same as the principle")
    names = _unique_names([e.name or _name_from(e.positive) for e in chosen])
    data = {
        "name": name,
        "principles": [{"name": n, "positive": e.positive, "negative": e.negative} for n, e in zip(names, chosen)],
    }
    try:
        return constitution_from_dict(data, "the writer's answer")
    except SamiError as err:
        raise DraftError(str(err)) from None


def _clean(text: str) -> str:
    text = re.sub(r"<think>.*?</think>", "", text or "", flags=re.S | re.I)
    if "</think>" in text.lower():
        text = text[text.lower().rindex("</think>") + len("</think>") :]
    text = re.sub(r"^\s*```[\w-]*\s*$", "", text, flags=re.M)  # code fences
    return text.strip()


def _from_json(text: str) -> list[_Entry] | None:
    """Entries from the first JSON value in the text that holds principles, or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            value = next((v for k, v in value.items() if str(k).lower() in ("principles", "constitution")), value)
        items = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
        entries = [_entry_from_dict(d) for d in items if isinstance(d, dict)]
        entries = [e for e in entries if e.positive or e.negative]
        if entries:
            return entries
    return None


def _entry_from_dict(d: dict) -> _Entry:
    lowered = {str(k).strip().lower().replace(" ", "_"): v for k, v in d.items()}

    def pick(keys: tuple[str, ...]) -> str:
        for key in keys:
            v = lowered.get(key)
            if isinstance(v, str) and v.strip():
                return _tidy(v)
        return ""

    return _Entry(pick(NAME_KEYS), pick(POSITIVE_KEYS), pick(NEGATIVE_KEYS))


_SEP = r"\s*(?:[:=]|[-–—](?=\s))\s*"
_HEADER = re.compile(
    r"^(?:principle|rule)\s*#?\s*\d+\s*(?:\((?P<paren>[^)]*)\))?\s*(?:[:.)=]|[-–—](?=\s)|$)\s*(?P<rest>.*)$", re.I
)
_NUMBERED = re.compile(r"^\d+\s*[.)]\s+(?P<rest>.*)$")
_FIELD = re.compile(
    r"^(?P<key>name|title|positive|principle|wording|statement|thesis|negative|antithesis|opposite|"
    r"anti-principle|counter-principle|contrary|inverse)"
    r"(?:\s+(?:wording|version|form|statement|principle))?(?:\s*\([^)]*\))?" + _SEP + r"(?P<value>.*)$",
    re.I,
)


def _from_lines(text: str) -> list[_Entry]:
    """Entries from labelled lines: 'Principle 1: name', 'Positive: ...', 'Negative: ...' and variants."""
    entries: list[_Entry] = []
    current: _Entry | None = None

    def start(name: str = "") -> _Entry:
        entry = _Entry(name=_tidy(name))
        entries.append(entry)
        return entry

    for raw in text.splitlines():
        line = _strip_markdown(raw)
        if not line:
            if current is not None:
                current.last = ""  # a blank line ends a wording; what follows is not part of it
            continue
        header = _HEADER.match(line) or _NUMBERED.match(line)
        if header:
            rest = header.group("rest").strip()
            field = _FIELD.match(rest)
            if field and _kind(field.group("key")) != "name":
                current = start(header.groupdict().get("paren") or "")
                _set(current, field.group("key"), field.group("value"))
            else:
                current = start(header.groupdict().get("paren") or (field.group("value") if field else rest))
            continue
        field = _FIELD.match(line)
        if field:
            key = _kind(field.group("key"))
            if current is None or getattr(current, key):
                current = start()  # a repeated field begins the next principle
            _set(current, field.group("key"), field.group("value"))
        elif current is not None and current.last:
            setattr(current, current.last, _tidy(getattr(current, current.last) + " " + line))
    return entries


def _kind(key: str) -> str:
    key = key.lower()
    if key in ("name", "title"):
        return "name"
    if key in ("negative", "antithesis", "opposite", "anti-principle", "counter-principle", "contrary", "inverse"):
        return "negative"
    return "positive"


def _set(entry: _Entry, key: str, value: str) -> None:
    kind = _kind(key)
    setattr(entry, kind, _tidy(value))
    entry.last = kind if kind != "name" else ""


def _strip_markdown(line: str) -> str:
    line = line.strip()
    line = re.sub(r"^(?:#+|>|[-*•+](?=\s))\s*", "", line)  # headings, quotes, bullets
    line = line.replace("**", "").replace("__", "")
    return line.strip()


def _tidy(text: str) -> str:
    text = " ".join(str(text).split())
    return text.strip().strip("*_`").strip().strip('"“”').strip()


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _name_from(wording: str) -> str:
    words = re.findall(r"[A-Za-z0-9']+", wording)[:4]
    return " ".join(words).lower() or "principle"


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        n = n.strip().rstrip(".:") or "principle"
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} {seen[n]}")
    return out


# ---- drafting ------------------------------------------------------------------------------------


def writer_messages(task: str, k: int) -> Messages:
    """The first request to the writer."""
    return [{"role": "user", "content": WRITER_PROMPT.format(task=task.strip(), k=k)}]


def draft_with(
    complete: Complete,
    task: str,
    k: int,
    name: str = "constitution",
    retries: int = 3,
    on_attempt: Callable[[int, str, str | None], None] | None = None,
) -> Constitution:
    """Ask `complete` for principles until one answer parses (1 + `retries` tries); raises SamiError.

    After a malformed answer the next request shows the model its answer and what was wrong.
    `on_attempt(attempt, answer, error)` sees every answer (error None when it parsed).
    """
    if not task.strip():
        raise SamiError("--task is empty; describe the task the principles are for")
    if k < 1:
        raise SamiError(f"--principles {k}: must be at least 1")
    first = writer_messages(task, k)
    messages = first
    reason = ""
    for attempt in range(1, retries + 2):
        answer = complete(messages)
        try:
            constitution = parse_principles(answer, k, name)
        except DraftError as e:
            reason = str(e)
            if on_attempt:
                on_attempt(attempt, answer, reason)
            messages = first + [
                {"role": "assistant", "content": answer.strip()[:4000]},
                {"role": "user", "content": RETRY_PROMPT.format(reason=reason, k=k)},
            ]
            continue
        if on_attempt:
            on_attempt(attempt, answer, None)
        return constitution
    tries = f"{retries + 1} tr{'y' if retries == 0 else 'ies'}"
    raise SamiError(
        f"the writer's answer could not be read as {k} principles after {tries} "
        f"(last: {reason}); try a larger instruct model, more --retries or another --temperature"
    )


def model_completer(
    model,
    tokenizer,
    max_tokens: int,
    temperature: float = 0.7,
    top_p: float = 1.0,
    chat_template: bool | None = None,
    seed: int = 0,
) -> Complete:
    """A `Complete` that samples from an mlx-lm model, through its chat template when it has one."""
    import mlx.core as mx

    from sami_mlx.chat import use_chat_template
    from sami_mlx.loop.rollout import generate_batch

    refuse = "--chat-template: the writer's tokenizer has no chat template; drop the flag"
    use_chat = use_chat_template(tokenizer, chat_template, refuse)
    calls = [0]

    def complete(messages: Messages) -> str:
        if use_chat:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = list(tokenizer.encode(text, add_special_tokens=False))
        else:
            ids = list(tokenizer.encode(_plain_transcript(messages)))
        mx.random.seed(seed + calls[0])  # each retry draws afresh, repeatably
        calls[0] += 1
        text = generate_batch(model, tokenizer, [ids], max_tokens, temperature, top_p, batch_size=1)[0].text
        return text if use_chat else PLAIN_PRIMER + text

    return complete


def _plain_transcript(messages: Messages) -> str:
    """A base model has no chat template: write the turns as a dialogue it can continue."""
    who = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = [f"{who.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant: " + PLAIN_PRIMER


def draft_constitution(
    model,
    tokenizer,
    task: str,
    k: int,
    name: str = "constitution",
    retries: int = 3,
    max_tokens: int | None = None,
    temperature: float = 0.7,
    top_p: float = 1.0,
    chat_template: bool | None = None,
    seed: int = 0,
    on_attempt: Callable[[int, str, str | None], None] | None = None,
) -> Constitution:
    """Draft a validated K-principle constitution for `task` with a loaded writer model (for the CLI and TUI)."""
    complete = model_completer(
        model, tokenizer, max_tokens or default_max_tokens(k), temperature, top_p, chat_template, seed
    )
    return draft_with(complete, task, k, name, retries, on_attempt)


def default_max_tokens(k: int) -> int:
    """Room for k principles of two sentences each, plus some slack."""
    return 160 + 110 * k
