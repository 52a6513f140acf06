"""A synthetic principles world: a corpus where replies follow stated principles only weakly.

Every principle has a behaviour a program can check (register, length, numbers, format).
In the corpus, each principle has a *default* behaviour the replies lean to whatever the
constitution says, so greedy decoding reveals nothing; the stated wording only tilts the odds.
That weak, latent link is what SAMI should amplify without labels.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sami_mlx.inputs.constitution import Constitution, Principle, Variant
from sami_mlx.inputs.prompts import Template

VERSION = 4  # bump when the corpus changes: cached toy models are keyed on it
NAME = "toy-world"

FORMAL = [
    "certainly",
    "indeed",
    "kindly",
    "therefore",
    "moreover",
    "regarding",
    "appropriate",
    "sincerely",
    "consequently",
    "furthermore",
    "notably",
    "accordingly",
]
CASUAL = [
    "yeah",
    "hey",
    "cool",
    "gonna",
    "stuff",
    "kinda",
    "awesome",
    "okay",
    "totally",
    "pretty",
    "basically",
    "anyway",
]
NEUTRAL = [
    "the",
    "is",
    "a",
    "very",
    "good",
    "thing",
    "about",
    "and",
    "it",
    "you",
    "can",
    "find",
    "often",
    "most",
    "people",
    "like",
    "this",
    "for",
    "with",
    "all",
]
NUMBERS = ["2", "3", "5", "7", "10", "12", "20", "100"]
TOPICS = [
    "apples",
    "rivers",
    "trains",
    "music",
    "gardens",
    "bread",
    "clouds",
    "chess",
    "bikes",
    "tea",
    "maps",
    "stars",
    "bees",
    "boats",
    "paint",
    "snow",
    "books",
    "lamps",
    "shoes",
    "bridges",
    "coffee",
    "forests",
    "kites",
    "clocks",
    "ponds",
    "birds",
    "cheese",
    "tents",
    "rain",
    "salt",
    "hills",
    "robots",
    "soup",
    "candles",
    "islands",
    "ladders",
    "owls",
    "pianos",
    "deserts",
    "moss",
]
QUESTION_FORMS = [
    "Tell me about {t}.",
    "What do you know about {t}?",
    "Explain {t}.",
    "Any thoughts on {t}?",
    "Describe {t}.",
    "Why do people like {t}?",
]

WORLD = Constitution(
    "toy-world",
    (
        Principle("register", "Speak formally.", "Speak casually."),
        Principle("length", "Keep answers short.", "Give long answers."),
        # Each wording has a word of its own ("statistics" / "numbers"), as in the other principles.
        Principle("numbers", "Include statistics.", "Avoid numbers."),
        Principle("format", "Answer as a list.", "Answer in one sentence."),
    ),
)
# The behaviour each principle's replies lean to whatever is stated: True = the positive wording's.
DEFAULTS = {"register": False, "length": True, "numbers": False, "format": False}
TEMPLATE = Template("Constitution:\n{constitution}\n\nHuman: {query}\n\nAssistant:", "toy-world")
PLAIN = "Human: {query}\n\nAssistant:"  # plain dialogue: what held-out perplexity is measured on


@dataclass(frozen=True)
class WorldSpec:
    """How weak the latent link is: P(default behaviour | default stated), P(default | opposite stated)."""

    p_default_if_stated: float = 0.85
    p_default_if_opposed: float = 0.6
    p_default_if_absent: float = 0.7
    p_plain: float = 0.2  # share of plain dialogue with no constitution at all
    # Share of replies that show no register at all (no formal or casual word), whatever is stated:
    # as in real text, a principle is often not visible in a reply.
    p_unmarked: float = 0.0


def principle_names() -> list[str]:
    return [p.name for p in WORLD.principles]


def sub_constitution(names: Sequence[str]) -> Constitution:
    """The world's constitution restricted to `names` (file order kept)."""
    keep = set(names)
    return Constitution(WORLD.name, tuple(p for p in WORLD.principles if p.name in keep))


def make_query(rng: random.Random) -> str:
    return rng.choice(QUESTION_FORMS).format(t=rng.choice(TOPICS))


def queries(n: int, seed: int) -> list[str]:
    rng = random.Random(f"queries-{seed}")
    return [make_query(rng) for _ in range(n)]


def sample_behaviour(stated: dict[str, bool], spec: WorldSpec, rng: random.Random) -> dict[str, bool | None]:
    """Per principle: True if the reply shows the positive wording's behaviour (None: register not shown)."""
    out: dict[str, bool | None] = {}
    for name, default in DEFAULTS.items():
        if name not in stated:
            p = spec.p_default_if_absent
        elif stated[name] == default:
            p = spec.p_default_if_stated
        else:
            p = spec.p_default_if_opposed
        out[name] = default if rng.random() < p else not default
    if spec.p_unmarked and rng.random() < spec.p_unmarked:
        out["register"] = None
    return out


def write_reply(query: str, behaviour: dict[str, bool | None], rng: random.Random) -> str:
    """A reply about the query's topic showing exactly the given behaviours."""
    topic = next((t for t in TOPICS if t in query), rng.choice(TOPICS))
    register = {True: FORMAL, False: CASUAL, None: NEUTRAL}[behaviour["register"]]
    n_words = rng.randint(3, 5) if behaviour["length"] else rng.randint(11, 15)
    words = [rng.choice(register), topic]
    while len(words) < n_words:
        words.append(rng.choice(register) if rng.random() < 0.4 else rng.choice(NEUTRAL))
    rng.shuffle(words)
    if behaviour["numbers"]:
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words)), rng.choice(NUMBERS))
    if behaviour["format"]:
        cuts = sorted(rng.sample(range(1, len(words)), min(2, len(words) - 1)))
        items = [words[a:b] for a, b in zip([0, *cuts], [*cuts, len(words)]) if words[a:b]]
        return "\n".join("- " + " ".join(item) for item in items)
    return " ".join(words) + "."


def example(rng: random.Random, spec: WorldSpec) -> tuple[str, str]:
    """One pretraining example: a prompt with a random sub-constitution and query, and its reply."""
    if rng.random() < spec.p_plain:
        return plain_example(rng, spec)
    names = [p.name for p in WORLD.principles if rng.random() < 0.6] or [rng.choice(principle_names())]
    rng.shuffle(names)
    stated = {name: rng.random() < 0.5 for name in names}
    order = [principle_names().index(n) for n in names]
    text = WORLD.render(Variant(tuple(stated.get(p.name, True) for p in WORLD.principles)), order)
    query = make_query(rng)
    return TEMPLATE.fill(text, query), " " + write_reply(query, sample_behaviour(stated, spec, rng), rng)


def plain_example(rng: random.Random, spec: WorldSpec) -> tuple[str, str]:
    """Plain dialogue: no constitution, replies follow the prior."""
    query = make_query(rng)
    return PLAIN.format(query=query), " " + write_reply(query, sample_behaviour({}, spec, rng), rng)


def plain_corpus(n: int, seed: int, spec: WorldSpec = WorldSpec()) -> list[tuple[str, str]]:
    """Held-out plain dialogue, for the perplexity check."""
    rng = random.Random(f"plain-{seed}")
    return [plain_example(rng, spec) for _ in range(n)]


def corpus(n: int, seed: int, spec: WorldSpec = WorldSpec()) -> list[tuple[str, str]]:
    """`n` (prompt, reply) pairs; a document is their concatenation."""
    rng = random.Random(f"corpus-{seed}")
    return [example(rng, spec) for _ in range(n)]


# ---- the checker ------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")


def behaviour_of(reply: str) -> dict[str, bool | None]:
    """What a reply shows, per principle: True (positive behaviour), False, or None (neither)."""
    words = _WORD.findall(reply.lower())
    formal = sum(w in FORMAL for w in words)
    casual = sum(w in CASUAL for w in words)
    return {
        "register": None if formal == casual else formal > casual,
        "length": None if not words else len(words) <= 8,
        "numbers": bool(re.search(r"\d", reply)),
        "format": bool(re.search(r"(^|\n)\s*- ", reply)),
    }


def adherence(reply: str, constitution: Constitution, variant: Variant) -> dict[str, float]:
    """Per principle of `constitution`: 1.0 if the reply does what the variant's wording says."""
    shown = behaviour_of(reply)
    return {
        p.name: float(shown[p.name] is not None and shown[p.name] == sign)
        for p, sign in zip(constitution.principles, variant.signs)
    }
