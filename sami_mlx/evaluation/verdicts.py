"""Reading a judge's verdict ("A", "B" or neither) from the text of its reply."""

from __future__ import annotations

import re

# Judges answer in many styles: a bare letter on the last line, "Final Response: A" (the paper's
# judge), "Verdict: **B**", "Response A is better", "Summary B aligns more closely", "(A)",
# "[[B]]", "\boxed{A}", often after a <think> block. The letter must be a capital A or B standing
# alone: "A good summary..." uses the article, not the letter. The rules run from the most explicit
# to the least, and a reply whose rules disagree is unparsable rather than guessed.

_LETTER_LABEL = r"(?:(?:assistant\s+)?(?:response|reply|summary|option|answer|candidate|output|assistant)\s+)"
_OPEN = r"[\s*_`'\"“”‘’(\[<{#:>-]*"
_CLOSE = r"[\s*_`'\"“”‘’)\]>}.,!:;]*"
_BARE = re.compile(rf"^{_OPEN}(?i:{_LETTER_LABEL})?([AB]){_CLOSE}$")
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*([AB])\s*\}?\s*\}")
_ARENA = re.compile(r"^\[\[\s*([AB])\s*(?:>>?|≫)\s*[AB]\s*\]\]$")
_LABEL = re.compile(
    r"(?i:final\s+(?:response|answer|verdict|choice|decision|judge?ment|selection)|verdict|answer|choice|"
    r"decision|winner|preferred\s+(?:response|summary|reply)|better\s+(?:response|summary|reply)|preference|"
    r"judge?ment)"
    r"\s*(?:\*\*|__)?\s*(?:is\s*(?::)?|:|-|=|→|->)\s*"
)
# What follows a label: the letter (any case when nothing but punctuation follows it).
_AFTER_LABEL = re.compile(rf"^{_OPEN}(?i:{_LETTER_LABEL})?(?:([AB])(?![\w'’])|([ab])(?=[\s*_`'\"”’)\]>}}.,!]*$))")
_UNDECIDED = re.compile(r"(?i)^\W*(?:tie|both|neither|none|equal|equally|draw|undecided|cannot|can't|n/?a)\b")
_STRONG = (
    r"(?:is|was|seems|appears)\s+(?:clearly\s+|slightly\s+|much\s+|somewhat\s+)?(?:the\s+)?"
    r"(?:better|superior|preferable|preferred|stronger|winner|more\s+aligned|more\s+closely\s+aligned|"
    r"more\s+consistent|more\s+faithful)"
    r"|(?:better|more\s+closely|more\s+fully|best)\s+(?:follows|aligns|adheres|meets|satisfies|fulfils|fulfills|"
    r"matches|captures|reflects|complies|respects)"
    r"|(?:follows|aligns\s+with|adheres\s+to|meets|satisfies)\s+(?:the\s+\w+\s+)*?(?:better|more\s+closely)"
    r"|aligns\s+(?:better|more\s+closely)|wins|is\s+my\s+(?:choice|pick)"
)
_PHRASES = [
    re.compile(rf"\b(?i:{_LETTER_LABEL})?\**([AB])\**\s+(?i:{_STRONG})\b"),
    re.compile(
        r"\b(?i:i\s+(?:would\s+|'d\s+)?(?:prefer|choose|pick|select|go\s+with)|prefer(?:red|s)?|"
        r"(?:choose|pick|select|go\s+with))\s+(?i:" + _LETTER_LABEL + r")?\**([AB])\**(?![\w'’])"
    ),
    re.compile(
        r"(?i:the\s+(?:better|preferred|stronger|winning)\s+(?:one|response|summary|reply)\s+is)\s+"
        r"(?i:" + _LETTER_LABEL + r")?\**([AB])\**(?![\w'’])"
    ),
]
_SHORT_LAST = re.compile(r"(?:^|\s)\**([AB])\**[\s.!)\]*\"”’]*$")


def _strip_thinking(text: str) -> str:
    """The reply after any reasoning block; empty when the reply stopped inside one."""
    text = _THINK.sub("", text)
    lower = text.lower()
    if "</think>" in lower:  # the reply began inside a think block whose opening tag was in the prompt
        text = text[lower.rindex("</think>") + len("</think>") :]
    elif "<think>" in lower:  # cut off while still thinking: no verdict yet
        text = text[: lower.index("<think>")]
    return text


def _after_label(rest: str) -> tuple[str | None, bool]:
    """(letter, decided) from the text after a label such as 'Final Response:'."""
    rest = rest.lstrip(" \t")
    if rest.startswith("\n"):  # the paper's format puts the letter on the next line
        rest = rest.strip()
    line = rest.split("\n", 1)[0].strip()
    if _UNDECIDED.match(line.strip("*_`'\"<>[]() ")):
        return None, True
    m = _AFTER_LABEL.match(line)
    if not m:
        return None, False
    letter = (m.group(1) or m.group(2)).upper()
    other = "B" if letter == "A" else "A"
    # An echo of the instructions ("<"A" or "B">") names both letters: no verdict.
    if re.search(rf"(?:\bor\b|\band\b|/|,)\s*[\"'“”*(<\[]*{other}(?![\w'’])", line[m.end() :]):
        return None, True
    return letter, True


_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


def parse_verdict(text: str) -> str | None:
    """'A' or 'B' from a judge's reply, None when it names neither (or both).

    In order: a last line that is only the verdict ('B', '**A**', '(A)', 'Summary B', '[[A]]'); the
    last labelled answer ('Final Response: A', 'Verdict: **B**', 'The answer is A'); a boxed letter;
    a phrase that picks one ('Response B is better', 'A better follows...', 'I prefer Summary A'),
    read on the last line first, then over the whole reply when every such phrase agrees; a short
    last line that ends with the letter ('So, B.').
    """
    text = _strip_thinking(text or "")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    for pattern in (_BARE, _ARENA):
        m = pattern.match(last)
        if m:
            return m.group(1).upper()
    labelled = list(_LABEL.finditer(text))
    for m in reversed(labelled):
        letter, decided = _after_label(text[m.end() :])
        if decided:
            return letter
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    for scope in (last, text):
        found = [m.group(1) for p in _PHRASES for m in p.finditer(scope)]
        if found and len(set(found)) == 1:
            return found[0]
        if found and scope is last:
            return None  # the verdict line names both: do not guess
    m = _SHORT_LAST.search(last)
    if m and len(last.split()) <= 5:
        return m.group(1)
    return None
