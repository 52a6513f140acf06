"""Constitutions: principles in positive and negative wording, variants, and rendering."""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sami_mlx.errors import SamiError
from sami_mlx.fileio import (
    EditableFile,
    atomic_write_text,
    dump_editable,
    dump_yaml,
    read_editable,
    read_structured,
    yaml_scalar,
)

MAX_GRID_PRINCIPLES = 6  # 2**6 = 64 variants, 4096 scored pairs per query


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


@dataclass(frozen=True)
class Principle:
    """One principle: its name, its wording, and its antithesis."""

    name: str
    positive: str
    negative: str


@dataclass(frozen=True)
class Variant:
    """A choice of wording per principle: True keeps the positive, False takes the negative."""

    signs: tuple[bool, ...]

    @property
    def label(self) -> str:
        """A compact label such as '+-+' (one sign per principle, in file order)."""
        return "".join("+" if s else "-" for s in self.signs)

    @property
    def is_positive(self) -> bool:
        return all(self.signs)


@dataclass(frozen=True)
class Constitution:
    """A named list of principles."""

    name: str
    principles: tuple[Principle, ...]

    def render(self, variant: Variant, order: Sequence[int] | None = None) -> str:
        """The variant's wordings as numbered lines, in `order` (file order by default)."""
        order = range(len(self.principles)) if order is None else order
        lines = []
        for n, k in enumerate(order, start=1):
            p = self.principles[k]
            lines.append(f"{n}. {p.positive if variant.signs[k] else p.negative}")
        return "\n".join(lines)

    @property
    def positive_variant(self) -> Variant:
        return Variant((True,) * len(self.principles))

    def echoes(self, text: str, words: int = 6) -> bool:
        """Whether `text` repeats `words` words in a row of any principle's wording (either sign): a
        response that copies its constitution, which tells the variants apart without following them."""
        said = " " + " ".join(_words(text)) + " "
        for p in self.principles:
            for wording in (p.positive, p.negative):
                w = _words(wording)
                if any(f" {' '.join(w[i : i + words])} " in said for i in range(len(w) - words + 1)):
                    return True
        return False

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "principles": [{"name": p.name, "positive": p.positive, "negative": p.negative} for p in self.principles],
        }


@dataclass(frozen=True)
class Problem:
    """One thing to fix in a constitution: the loader's one-line error, and what the editor shows under
    each principle it concerns (by index)."""

    message: str
    notes: dict[int, str] = field(default_factory=dict)


FIELD_LABELS = {"name": "name", "positive": "positive wording", "negative": "negative wording"}


def constitution_problems(data: object, source: str = "constitution") -> list[Problem]:
    """Everything wrong with a parsed constitution, in the order the loader reports them (the first
    one is its error); empty when it is valid. The TUI's editor shows the notes under each principle."""
    if not isinstance(data, dict):
        return [Problem(f"{source}: expected a mapping with 'name' and 'principles', got {type(data).__name__}")]
    out = []
    name = data.get("name", "constitution")
    if not isinstance(name, str) or not name.strip():
        out.append(Problem(f"{source}: field 'name' must be a non-empty string"))
    principles = data.get("principles")
    if principles is None:
        return [*out, Problem(f"{source}: missing field 'principles'; add a list of principles")]
    if not isinstance(principles, list) or not principles:
        return [*out, Problem(f"{source}: field 'principles' must be a non-empty list")]
    names = [_name(p) for p in principles]
    for i, p in enumerate(principles):
        where = f"{source}: {principle_label(i, names[i])}"
        if not isinstance(p, dict):
            out.append(Problem(f"{where} must be a mapping with name, positive and negative", {i: "not a mapping"}))
            continue
        for key, label in FIELD_LABELS.items():
            if key not in p:
                out.append(Problem(f"{where}: missing field '{key}'", {i: f"{label} is missing"}))
            elif not isinstance(p[key], str):
                got = type(p[key]).__name__
                out.append(Problem(f"{where}: field '{key}' must be a string, got {got}", {i: f"{label} must be text"}))
            elif not p[key].strip():
                fix = "give it a name" if key == "name" else "write its wording"
                out.append(Problem(f"{where}: field '{key}' is empty; {fix}", {i: f"{label} is empty"}))
        twins = [j for j, other in enumerate(names) if names[i] and other == names[i]]
        if len(twins) > 1 and i != twins[0]:  # a repeat: flagged here, and on the first one at the first repeat
            notes = {j: _twin_note(names[i], j, twins) for j in ([twins[0], i] if i == twins[1] else [i])}
            taken = f"the name is taken by principle {twins[0] + 1}"
            out.append(Problem(f"{where}: {taken}; give each principle its own name", notes))
    return out


def principle_label(i: int, name: str = "") -> str:
    """How errors name the principle at index `i`: counted from 1 as the editor numbers its cards, with
    its name when it has one ("principle 2 (kind)")."""
    return f"principle {i + 1} ({name})" if name else f"principle {i + 1}"


def _name(p: object) -> str:
    return p["name"].strip() if isinstance(p, dict) and isinstance(p.get("name"), str) else ""


def _twin_note(name: str, j: int, twins: list[int]) -> str:
    others = ", ".join(str(k + 1) for k in twins if k != j)
    return f"name '{name}' is also principle {others}; give each its own name"


def constitution_from_dict(data: object, source: str = "constitution") -> Constitution:
    """Validate a parsed constitution, raising a SamiError that names the field and the fix."""
    problems = constitution_problems(data, source)
    if problems:
        raise SamiError(problems[0].message)
    assert isinstance(data, dict)
    principles = [
        Principle(p["name"].strip(), " ".join(p["positive"].split()), " ".join(p["negative"].split()))
        for p in data["principles"]
    ]
    return Constitution(data.get("name", "constitution").strip(), tuple(principles))


def load_constitution(path: str | Path) -> Constitution:
    """Load a constitution from a JSON or YAML file."""
    return constitution_from_dict(read_structured(path, "constitution file"), str(path))


def save_constitution(
    constitution: Constitution,
    path: str | Path,
    original: EditableFile | None = None,
    origins: Sequence[int | None] = (),
) -> EditableFile | None:
    """Save atomically as JSON (.json) or YAML (anything else). Given the file it was edited from
    (read_constitution_file), only what changed is rewritten: comments, key order, quoting and unknown
    keys stay. `origins[i]` is the index in that file of principle i (None or missing: a new one).
    Returns the file as now saved, to edit further (None without `original`)."""
    as_json = Path(path).suffix.lower() == ".json"
    if original is None:
        data = constitution.to_dict()
        atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n" if as_json else dump_yaml(data))
        return None
    updated = EditableFile(update_document(original.data, constitution, origins), original.is_json, original.indent)
    atomic_write_text(path, dump_editable(updated, as_json))
    return updated


def read_constitution_file(path: str | Path) -> EditableFile:
    """A constitution file read for save_constitution to update in place (it need not be valid)."""
    return read_editable(path, "constitution file")


def update_document(data: Any, constitution: Constitution, origins: Sequence[int | None] = ()) -> Any:
    """A copy of a parsed constitution file (`data`) holding `constitution`: each principle updates the
    entry it came from (`origins`, see save_constitution), so that the entry's other keys and comments
    stay, and a value that did not change keeps its exact text (a wording is compared as the loader
    reads it, whitespace collapsed)."""
    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    old = data.get("principles")
    old = old if isinstance(old, list) else []
    entries = []
    for i, p in enumerate(constitution.principles):
        k = origins[i] if i < len(origins) else None
        entry = old[k] if k is not None and 0 <= k < len(old) and isinstance(old[k], dict) else _new_entry(old)
        for key, value in (("name", p.name), ("positive", p.positive), ("negative", p.negative)):
            _set_text(entry, key, value, wording=key != "name")
        entries.append(entry)
    if "name" in data or constitution.name != "constitution":  # the loader's default needs no key
        if "name" not in data:  # first, as a new file has it
            data.insert(0, "name", constitution.name) if hasattr(data, "insert") else data.update(
                {"name": constitution.name, **data}
            )
        _set_text(data, "name", constitution.name, wording=False)
    if [id(e) for e in entries] != [id(e) for e in old]:
        if isinstance(data.get("principles"), list):
            data["principles"][:] = entries  # the list itself keeps its comments and style
        else:
            data["principles"] = entries
    return data


def _new_entry(siblings: list) -> dict:
    """An empty entry for a new principle, in the style of the file's others (flow or block)."""
    proto = next((e for e in siblings if isinstance(e, dict)), None)
    entry = type(proto)() if proto is not None else {}
    style = getattr(proto, "fa", None)  # ruamel.yaml's format attribute: {a: 1} or a block
    if style is not None and style.flow_style():
        entry.fa.set_flow_style()  # type: ignore[attr-defined]
    return entry


def _set_text(entry: dict, key: str, value: str, wording: bool) -> None:
    """Put `value` under `key`, leaving the old text alone when it reads as the same value."""
    before = entry.get(key)
    if isinstance(before, str) and (" ".join(before.split()) if wording else before.strip()) == value:
        return
    entry[key] = yaml_scalar(value, before) if hasattr(entry, "ca") else value  # `ca`: read by ruamel.yaml


AUTO_VARIANTS = 8  # 'auto': every variant up to this many (3 principles), else this many random ones


def parse_variants(value: str | int) -> str | int:
    """Validate a --variants value: 'auto', 'paper', 'grid' or an integer >= 2."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isascii() and value.strip().isdigit()):
        n = int(value)
        if n < 2:
            raise SamiError(f"--variants {n}: need at least 2 variants to compare")
        return n
    if value in ("auto", "paper", "grid"):
        return value
    raise SamiError(f"--variants {value!r}: use 'auto', 'paper', 'grid' or an integer >= 2")


def variant_strategy(value: str) -> str | int:
    """The strategy a resolved `variants` setting names: 'paper', 'grid' or an int."""
    return int(value) if value.isascii() and value.isdigit() else value


def concrete_strategy(strategy: str | int, num_principles: int) -> str | int:
    """'auto' made concrete: every variant while there are at most AUTO_VARIANTS (the paper's two per
    query left a toy world unmoved where all eight aligned it), else AUTO_VARIANTS random ones."""
    if strategy != "auto":
        return strategy
    return "grid" if 2**num_principles <= AUTO_VARIANTS else AUTO_VARIANTS


def num_variants(strategy: str | int, num_principles: int) -> int:
    """How many variants per query a strategy gives; raises if the constitution cannot supply them."""
    strategy = concrete_strategy(strategy, num_principles)
    total = 2**num_principles
    if strategy == "paper":
        return 2
    if strategy == "grid":
        if num_principles > MAX_GRID_PRINCIPLES:
            raise SamiError(
                f"--variants grid with {num_principles} principles makes {total} variants per query; "
                f"use an integer number of variants instead"
            )
        return total
    if not isinstance(strategy, int):
        raise SamiError(f"--variants {strategy!r}: use 'auto', 'paper', 'grid' or an integer >= 2")
    if strategy > total:
        raise SamiError(
            f"--variants {strategy}: a constitution with {num_principles} principle(s) has only "
            f"{total} distinct variants; use at most {total}"
        )
    return strategy


def sample_variants(strategy: str | int, num_principles: int, rng: random.Random) -> list[Variant]:
    """Pick the variants for one query by strategy: 'auto', 'paper', 'grid' or an integer N."""
    strategy = concrete_strategy(strategy, num_principles)
    n = num_variants(strategy, num_principles)
    k = num_principles
    if strategy == "grid":
        return [Variant(tuple(s)) for s in itertools.product((True, False), repeat=k)]
    if strategy == "paper":
        # The all-positive variant against one random variant with at least one negative.
        code = rng.randrange(0, 2**k - 1)  # never all-positive (2**k - 1)
        return [Variant((True,) * k), _variant_from_code(code, k)]
    codes = rng.sample(range(2**k), n)
    return [_variant_from_code(c, k) for c in codes]


def _variant_from_code(code: int, k: int) -> Variant:
    return Variant(tuple(bool(code >> (k - 1 - b) & 1) for b in range(k)))


def principle_order(num_principles: int, rng: random.Random, shuffle: bool) -> list[int]:
    """The order principles appear in a training prompt: shuffled unless turned off."""
    order = list(range(num_principles))
    if shuffle:
        rng.shuffle(order)
    return order


def variant_orders(order: Sequence[int], n: int, key: str, shuffle: bool) -> list[list[int]]:
    """One principle order per variant of a group, the first being `order`: the others are `order`
    rearranged by a fixed pseudo-random permutation per (key, variant), so each is uniformly shuffled
    when `order` is, independently of the others across groups, and reproducible from `order` alone
    (a resumed run scores the same prompts)."""
    if not shuffle:
        return [list(order)] * n
    out = [list(order)]
    for j in range(1, n):
        perm = list(range(len(order)))
        random.Random(f"variant-order-{key}-{j}").shuffle(perm)
        out.append([order[p] for p in perm])
    return out
