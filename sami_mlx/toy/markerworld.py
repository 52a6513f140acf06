"""A second synthetic principles world, built apart from the toy world: randomised principle sets.

Each world draws its principles from a pool of themes; a principle's two wordings ask for one of
two disjoint sets of marker words ("Mention animals." / "Mention machines."), and a program checks
a reply by counting them. As in the toy world, replies lean to a default side whatever is stated,
and the stated wording only tilts the odds: a weak, latent link for SAMI to amplify. The prompt
template, the queries, the vocabulary and the model's shape are all this world's own, so settings
tuned on the toy world are tested here on a world nobody tuned them on.

A `MarkerWorld` offers what the demo needs of a world (the toy world's module offers the same).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import yaml

from sami_mlx.inputs.constitution import Constitution, Principle, Variant
from sami_mlx.inputs.prompts import Template

VERSION = 1  # bump when the corpus changes: cached models are keyed on it
NAME = "marker-world"


@dataclass(frozen=True)
class Theme:
    """A principle whose behaviour is visible as marker words from one of two sets."""

    name: str
    positive: str
    negative: str
    positive_words: tuple[str, ...]
    negative_words: tuple[str, ...]


# Each theme: its name, then its two wordings, each with the marker words that show it was followed.
THEME_TABLE = """
creatures:
  Mention animals.: cat horse sparrow fox whale beetle
  Mention machines.: engine gear motor lever pump valve
time:
  Talk about the past.: yesterday ancient once formerly history olden
  Talk about the future.: tomorrow soon someday upcoming future later
mood:
  Sound cheerful.: wonderful bright joyful lovely delightful sunny
  Sound gloomy.: dreary grim bleak dismal somber weary
setting:
  Set it by the sea.: shore tide harbor waves beach coral
  Set it in the mountains.: summit ridge cliff glacier peak valley
palette:
  Use warm colours.: crimson amber scarlet golden orange ruby
  Use cool colours.: azure teal indigo cyan violet navy
food:
  Mention sweets.: cake candy honey cookie syrup pudding
  Mention vegetables.: carrot onion celery spinach leek turnip
"""


def _themes(table: str) -> tuple[Theme, ...]:
    """The themes a table like THEME_TABLE lists, in its order."""
    themes = []
    for name, sides in yaml.safe_load(table).items():
        (positive, positive_words), (negative, negative_words) = sides.items()
        themes.append(Theme(name, positive, negative, tuple(positive_words.split()), tuple(negative_words.split())))
    return tuple(themes)


THEMES = _themes(THEME_TABLE)
FILLER = tuple("we think that there was an idea here of one so much near some many each from our to its".split())
SUBJECTS = tuple(
    "lanterns ferries quilts orchards violins canals meadows pottery marbles tunnels festivals windmills gardens"
    " statues puzzles rivers markets letters".split()
)
ASKS = (
    "What do you make of {s}?",
    "Say something about {s}.",
    "Write a line on {s}.",
    "How would you describe {s}?",
    "Give me a thought on {s}.",
)


@dataclass(frozen=True)
class WorldSpec:
    """How weak the latent link is (as in the toy world): P(default side | default stated), P(default |
    opposite stated), P(default | not stated); the share of plain prompts; of replies with no marker."""

    p_default_if_stated: float = 0.9
    p_default_if_opposed: float = 0.55
    p_default_if_absent: float = 0.7
    p_plain: float = 0.2
    p_unmarked: float = 0.2


class MarkerWorld:
    """One world: `principles` themes drawn by `seed`, each with a default side drawn too."""

    VERSION = VERSION
    NAME = NAME
    WorldSpec: TypeAlias = WorldSpec  # the toy world module and this class are used alike
    TEMPLATE = Template("### Guidelines\n{constitution}\n### Question\n{query}\n### Answer\n", NAME)
    PLAIN = "### Question\n{query}\n### Answer\n"

    def __init__(self, seed: int = 0, principles: int = 4):
        rng = random.Random(f"marker-world-{seed}")
        self.seed = seed
        self.themes = tuple(rng.sample(THEMES, principles))
        self.defaults = {t.name: rng.random() < 0.5 for t in self.themes}
        self.world = Constitution(NAME, tuple(Principle(t.name, t.positive, t.negative) for t in self.themes))

    def principle_names(self) -> list[str]:
        return [t.name for t in self.themes]

    def sub_constitution(self, names: Sequence[str]) -> Constitution:
        keep = set(names)
        return Constitution(NAME, tuple(p for p in self.world.principles if p.name in keep))

    def queries(self, n: int, seed: int) -> list[str]:
        rng = random.Random(f"marker-queries-{seed}")
        return [self._query(rng) for _ in range(n)]

    def _query(self, rng: random.Random) -> str:
        return rng.choice(ASKS).format(s=rng.choice(SUBJECTS))

    def _behaviour(self, stated: dict[str, bool], spec: WorldSpec, rng: random.Random) -> dict[str, bool | None]:
        out: dict[str, bool | None] = {}
        for t in self.themes:
            default = self.defaults[t.name]
            if t.name not in stated:
                p = spec.p_default_if_absent
            else:
                p = spec.p_default_if_stated if stated[t.name] == default else spec.p_default_if_opposed
            out[t.name] = None if rng.random() < spec.p_unmarked else (default if rng.random() < p else not default)
        return out

    def _reply(self, query: str, behaviour: dict[str, bool | None], rng: random.Random) -> str:
        subject = next((s for s in SUBJECTS if s in query), rng.choice(SUBJECTS))
        words = [subject]
        for t in self.themes:
            side = behaviour[t.name]
            if side is not None:
                pool = t.positive_words if side else t.negative_words
                words += rng.sample(pool, rng.randint(1, 2))
        while len(words) < rng.randint(7, 11):
            words.append(rng.choice(FILLER))
        rng.shuffle(words)
        return " ".join(words) + "."

    def _example(self, rng: random.Random, spec: WorldSpec) -> tuple[str, str]:
        query = self._query(rng)
        if rng.random() < spec.p_plain:
            return self.PLAIN.format(query=query), self._reply(query, self._behaviour({}, spec, rng), rng)
        names = [t.name for t in self.themes if rng.random() < 0.6] or [rng.choice(self.principle_names())]
        rng.shuffle(names)
        stated = {n: rng.random() < 0.5 for n in names}
        order = [self.principle_names().index(n) for n in names]
        text = self.world.render(Variant(tuple(stated.get(t.name, True) for t in self.themes)), order)
        return self.TEMPLATE.fill(text, query), self._reply(query, self._behaviour(stated, spec, rng), rng)

    def corpus(self, n: int, seed: int | str, spec: WorldSpec = WorldSpec()) -> list[tuple[str, str]]:
        """`n` (prompt, reply) pairs for pretraining."""
        rng = random.Random(f"marker-corpus-{self.seed}-{seed}")
        return [self._example(rng, spec) for _ in range(n)]

    def plain_corpus(self, n: int, seed: int, spec: WorldSpec = WorldSpec()) -> list[tuple[str, str]]:
        """Held-out plain dialogue: no guidelines, replies follow the prior."""
        rng = random.Random(f"marker-plain-{self.seed}-{seed}")
        out = []
        for _ in range(n):
            query = self._query(rng)
            out.append((self.PLAIN.format(query=query), self._reply(query, self._behaviour({}, spec, rng), rng)))
        return out

    def behaviour_of(self, reply: str) -> dict[str, bool | None]:
        words = re.findall(r"[a-z]+", reply.lower())
        out: dict[str, bool | None] = {}
        for t in self.themes:
            pos = sum(w in t.positive_words for w in words)
            neg = sum(w in t.negative_words for w in words)
            out[t.name] = None if pos == neg else pos > neg
        return out

    def adherence(self, reply: str, constitution: Constitution, variant: Variant) -> dict[str, float]:
        """Per principle of `constitution`: 1.0 if the reply does what the variant's wording says."""
        shown = self.behaviour_of(reply)
        return {
            p.name: float(shown[p.name] is not None and shown[p.name] == sign)
            for p, sign in zip(constitution.principles, variant.signs)
        }
