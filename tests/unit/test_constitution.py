"""Constitutions: loading, validation, rendering, variant strategies and saving."""

from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import bad_file_test
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import (
    MAX_GRID_PRINCIPLES,
    Constitution,
    Principle,
    Variant,
    constitution_from_dict,
    constitution_problems,
    load_constitution,
    num_variants,
    read_constitution_file,
    sample_variants,
    save_constitution,
)


def as_file(name: str, *principles: tuple[str, str, str]) -> dict:
    """A constitution as its file holds it, from its name and (name, positive, negative) principles."""
    return {"name": name, "principles": [{"name": n, "positive": p, "negative": q} for n, p, q in principles]}


THREE = as_file(
    "three",
    ("brief", "Be brief.", "Be long-winded."),
    ("kind", "Be kind.", "Be rude."),
    ("true", "Tell the truth.", "Make things up."),
)

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def three(tmp_path) -> Constitution:
    return load_constitution(write(tmp_path / "three.json", json.dumps(THREE)))


# --- loading -----------------------------------------------------------------------------


def test_load_json(tmp_path):
    c = load_constitution(write(tmp_path / "c.json", json.dumps(THREE)))
    assert c.name == "three"
    assert [p.name for p in c.principles] == ["brief", "kind", "true"]
    assert c.principles[0] == Principle("brief", "Be brief.", "Be long-winded.")
    assert c.principles[2].negative == "Make things up."


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_load_yaml(tmp_path, suffix):
    text = """\
name: helpful
principles:
  - name: helpful
    positive: Address the question that was asked.
    negative: Ignore the question.
  - name: honest
    positive: >-
      Say when you
      do not know.
    negative: "Pretend: always sure."
"""
    c = load_constitution(write(tmp_path / f"c{suffix}", text))
    assert c.name == "helpful"
    assert c.principles == (
        Principle("helpful", "Address the question that was asked.", "Ignore the question."),
        Principle("honest", "Say when you do not know.", "Pretend: always sure."),
    )


def test_loader_collapses_whitespace_in_wording(tmp_path):
    data = as_file("ws", (" p ", "  Be\n  calm\tand  clear. ", "Shout."))
    c = load_constitution(write(tmp_path / "c.json", json.dumps(data)))
    assert c.principles[0].name == "p"
    assert c.principles[0].positive == "Be calm and clear."


def test_name_defaults_when_absent(tmp_path):
    c = load_constitution(write(tmp_path / "c.yaml", "principles:\n  - {name: a, positive: A, negative: B}\n"))
    assert c.name == "constitution"
    assert len(c.principles) == 1


# --- rendering ----------------------------------------------------------------------------


def test_render_file_order(three):
    assert three.render(three.positive_variant) == "1. Be brief.\n2. Be kind.\n3. Tell the truth."
    assert three.render(Variant((True, False, False))) == "1. Be brief.\n2. Be rude.\n3. Make things up."


def test_render_in_given_order(three):
    # Numbers follow the position in the prompt; the wording follows the principle's own sign.
    text = three.render(Variant((False, True, True)), order=[2, 0, 1])
    assert text == "1. Tell the truth.\n2. Be long-winded.\n3. Be kind."


def test_a_response_echoes_the_constitution_when_it_repeats_words_in_a_row_of_a_wording():
    c = Constitution("c", (Principle("list", "The assistant answers with a numbered list.", "It never lists."),))
    assert c.echoes("1. THE ASSISTANT answers with a numbered list!\n2. Bread.")  # case and punctuation aside
    assert c.echoes("sure: the assistant answers with a numbered, list", words=6)
    assert not c.echoes("The assistant answers with a list.")  # 4 words in a row
    assert not c.echoes("the assistant answers withal a numbered list")  # whole words only
    assert c.echoes("It never lists.", words=3) and not c.echoes("It never lists.", words=4)  # shorter than 4


def test_variant_label_and_positive(three):
    assert three.positive_variant == Variant((True, True, True))
    assert three.positive_variant.is_positive
    assert Variant((True, False, True)).label == "+-+"
    assert not Variant((True, False, True)).is_positive


# --- variant strategies -------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_paper_strategy(k):
    for seed in range(20):
        variants = sample_variants("paper", k, random.Random(seed))
        assert len(variants) == 2
        assert variants[0].signs == (True,) * k
        assert len(variants[1].signs) == k
        assert not all(variants[1].signs)


def test_paper_strategy_reaches_every_non_positive_variant():
    seen = {sample_variants("paper", 2, random.Random(s))[1].signs for s in range(200)}
    assert seen == {(True, False), (False, True), (False, False)}


@pytest.mark.parametrize("k", [1, 2, 3, 4, MAX_GRID_PRINCIPLES])
def test_grid_strategy(k):
    variants = sample_variants("grid", k, random.Random(0))
    assert len(variants) == 2**k
    assert len({v.signs for v in variants}) == 2**k
    assert all(len(v.signs) == k for v in variants)
    assert num_variants("grid", k) == 2**k


@pytest.mark.parametrize(("k", "n", "every"), [(1, 2, True), (2, 4, True), (3, 8, True), (4, 8, False), (6, 8, False)])
def test_auto_strategy_is_every_variant_up_to_eight(k, n, every):
    variants = sample_variants("auto", k, random.Random(3))
    assert num_variants("auto", k) == n and len({v.signs for v in variants}) == n
    if every:  # the whole grid, in its order
        assert [v.signs for v in variants] == [v.signs for v in sample_variants("grid", k, random.Random(0))]


def test_grid_too_many_principles():
    with pytest.raises(SamiError, match="--variants grid"):
        sample_variants("grid", MAX_GRID_PRINCIPLES + 1, random.Random(0))


@pytest.mark.parametrize(("k", "n"), [(1, 2), (2, 3), (2, 4), (3, 5), (4, 16)])
def test_integer_strategy(k, n):
    variants = sample_variants(n, k, random.Random(1))
    assert len(variants) == n
    assert len({v.signs for v in variants}) == n
    assert all(len(v.signs) == k for v in variants)


@pytest.mark.parametrize(("k", "n"), [(1, 3), (2, 5), (3, 9)])
def test_integer_strategy_more_than_exist(k, n):
    with pytest.raises(SamiError, match=rf"--variants {n}\b.*at most {2**k}"):
        sample_variants(n, k, random.Random(0))


def test_sampling_is_seeded():
    a = [v.signs for v in sample_variants(5, 4, random.Random(7))]
    b = [v.signs for v in sample_variants(5, 4, random.Random(7))]
    assert a == b


# --- saving -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_load_round_trip(tmp_path, three, suffix):
    path = tmp_path / f"saved{suffix}"
    save_constitution(three, path)
    assert load_constitution(path) == three
    # The file is in the format its name says.
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert data == THREE


def test_save_overwrites_and_leaves_no_temp_files(tmp_path, three):
    out = tmp_path / "out"
    out.mkdir()
    path = out / "c.yaml"
    path.write_text("old")
    save_constitution(three, path)
    assert load_constitution(path) == three
    assert sorted(p.name for p in out.iterdir()) == ["c.yaml"]


# --- saving a file that was edited: only what changed is rewritten ---------------------------


def edited(path: Path, change) -> str:
    """Save `change(constitution)` over the file it was loaded from, as the editor does; the new text."""
    original = read_constitution_file(path)
    c = load_constitution(path)
    new, origins = change(c)
    save_constitution(new, path, original, origins)
    return path.read_text(encoding="utf-8")


def reword(c: Constitution, i: int, **fields: str) -> tuple[Constitution, list[int]]:
    ps = list(c.principles)
    ps[i] = Principle(**{"name": ps[i].name, "positive": ps[i].positive, "negative": ps[i].negative, **fields})
    return Constitution(c.name, tuple(ps)), list(range(len(ps)))


@pytest.mark.parametrize(
    "layout",
    [
        "principles:\n  - name: a\n    positive: A a.\n    negative: B b.\n",  # the project's own
        "principles:\n- name: a\n  positive: A a.\n  negative: B b.\n",  # the list flush with its key
        "principles:\n    -   name: a\n        positive: A a.\n        negative: B b.\n",  # wide
        "principles: [{name: a, positive: A a., negative: B b.}]\n",  # flow
    ],
)
def test_an_edited_yaml_file_keeps_its_layout(tmp_path, layout):
    text = f"# notes\nname: x  # short\n{layout}extra:\n  keep: 1\n"
    after = edited(write(tmp_path / "c.yaml", text), lambda c: reword(c, 0, negative="B c."))
    assert after == text.replace("B b.", "B c.")


def test_added_and_renamed_entries_follow_the_file_and_read_back(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "principles:\n  - {name: a, positive: A., negative: B.}\n  - {name: b, positive: C., negative: D.}\n",
    )
    new = Constitution("renamed", (Principle("n", "no", "1e5"), Principle("b", "C.", "D.")))
    after = edited(path, lambda c: (new, [None, 1]))  # a new first principle; a replaced by it
    assert after.startswith("name: renamed\n")  # the name key, absent before, comes first
    assert "  - {name: n, positive: 'no', negative: '1e5'}\n" in after  # flow, as its siblings; quoted
    assert load_constitution(path) == new


def test_the_default_name_adds_no_key_and_unchanged_text_stays_as_written(tmp_path):
    text = "principles:\n  - name: a\n    positive: |\n      Be   kind\n      and brief.\n    negative: B.\n"
    path = write(tmp_path / "c.yaml", text)
    assert edited(path, lambda c: (c, [0])) == text  # the block wording reads as "Be kind and brief."


@pytest.mark.parametrize(("source", "target"), [(".json", ".yaml"), (".yaml", ".json"), (".json", ".json")])
def test_unknown_keys_survive_json_and_a_change_of_format(tmp_path, source, target):
    data = {"name": "x", "v": 2, "principles": [{"name": "a", "positive": "A.", "negative": "B.", "w": 1}]}
    path = tmp_path / f"c{source}"
    path.write_text(json.dumps(data, indent=4) if source == ".json" else yaml.safe_dump(data, sort_keys=False))
    original = read_constitution_file(path)
    new = Constitution("x", (Principle("a", "A.", "C."),))
    out = tmp_path / f"out{target}"
    save_constitution(new, out, original, [0])
    data["principles"][0]["negative"] = "C."
    text = out.read_text()
    assert (json.loads(text) if target == ".json" else yaml.safe_load(text)) == data
    if (source, target) == (".json", ".json"):
        assert text == json.dumps(data, indent=4) + "\n"  # its indentation too


# --- validation ---------------------------------------------------------------------------

BAD = [
    ("not_mapping.yaml", "- a\n- b\n", "mapping"),
    ("missing.yaml", "name: x\n", "principles"),
    ("empty_list.json", '{"name": "x", "principles": []}', "principles"),
    ("principles_str.json", '{"name": "x", "principles": "be nice"}', "principles"),
    ("principle_str.yaml", "principles:\n  - be nice\n", "principle 1 must be a mapping"),
    ("no_negative.yaml", "principles:\n  - {name: a, positive: A}\n", "negative"),
    (
        "empty_positive.yaml",
        "principles:\n  - {name: a, positive: '  ', negative: B}\n",
        "principle 1 (a): field 'positive' is empty",
    ),
    (
        "empty_negative.json",
        '{"principles": [{"name": "a", "positive": "A", "negative": ""}]}',
        "principle 1 (a): field 'negative' is empty",
    ),
    (
        "duplicate.yaml",
        "principles:\n  - {name: a, positive: A, negative: B}\n  - {name: a , positive: C, negative: D}\n",
        "principle 2 (a): the name is taken by principle 1",
    ),
    (
        "int_wording.yaml",
        "principles:\n  - {name: a, positive: 42, negative: B}\n",
        "principle 1 (a): field 'positive' must be a string, got int",
    ),
    (
        "bool_wording.yaml",
        "principles:\n  - {name: a, positive: A, negative: no}\n",
        "principle 1 (a): field 'negative' must be a string, got bool",
    ),
    (
        "list_name.json",
        '{"principles": [{"name": ["a"], "positive": "A", "negative": "B"}]}',
        "principle 1: field 'name' must be a string, got list",
    ),
    ("int_name.yaml", "name: 5\nprinciples:\n  - {name: a, positive: A, negative: B}\n", "'name'"),
    ("bad.json", '{"name": "x", "principles": [', "invalid JSON"),
    ("bad.yaml", "name: x\nprinciples: [\n", "invalid YAML"),
]

test_validation_errors_name_file_and_field = bad_file_test([(load_constitution, *case) for case in BAD])


def test_problems_list_every_mistake_for_the_editor_and_the_first_is_the_loaders_error():
    doc = as_file(
        "c",
        ("kind", "Be kind.", ""),
        ("kind", "", "Ramble."),
        ("brief", "Be brief.", "Ramble."),
        (" kind ", "Be warm.", "Be cold."),
    )
    problems = constitution_problems(doc, "c.yaml")
    assert [p.message for p in problems] == [
        "c.yaml: principle 1 (kind): field 'negative' is empty; write its wording",
        "c.yaml: principle 2 (kind): field 'positive' is empty; write its wording",
        "c.yaml: principle 2 (kind): the name is taken by principle 1; give each principle its own name",
        "c.yaml: principle 4 (kind): the name is taken by principle 1; give each principle its own name",
    ]
    with pytest.raises(SamiError) as info:
        constitution_from_dict(doc, "c.yaml")
    assert str(info.value) == problems[0].message
    notes: dict[int, list[str]] = {}
    for p in problems:
        for i, note in p.notes.items():
            notes.setdefault(i, []).append(note)
    assert notes == {
        0: ["negative wording is empty", "name 'kind' is also principle 2, 4; give each its own name"],
        1: ["positive wording is empty", "name 'kind' is also principle 1, 4; give each its own name"],
        3: ["name 'kind' is also principle 1, 2; give each its own name"],
    }
    fixed = as_file("c", ("brief", "Be brief.", "Ramble."), ("kind", "K.", "R."))
    assert constitution_problems(fixed) == []
    assert [p.message for p in constitution_problems([1])] == [
        "constitution: expected a mapping with 'name' and 'principles', got list"
    ]


def test_wrong_type_message_says_what_it_got(tmp_path):
    path = write(tmp_path / "c.yaml", "principles:\n  - {name: a, positive: 42, negative: B}\n")
    with pytest.raises(SamiError, match="must be a string, got int"):
        load_constitution(path)


def test_missing_file_and_bad_bytes(tmp_path):
    with pytest.raises(SamiError, match="not found"):
        load_constitution(tmp_path / "nope.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SamiError, match=re.escape(str(bad)) + ".*UTF-8"):
        load_constitution(bad)


def test_from_dict_uses_source_name():
    with pytest.raises(SamiError, match=r"^my source: missing field 'principles'"):
        constitution_from_dict({"name": "x"}, "my source")


# --- properties ---------------------------------------------------------------------------

# Printable text: letters, digits, punctuation, symbols and plain spaces (no control or
# other separator characters). The loader strips names and collapses whitespace in wordings,
# so generated text is normalised the same way before use.
chars = st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"), whitelist_characters=" ")


def clean_text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(chars, min_size=1, max_size=max_size).map(lambda s: " ".join(s.split())).filter(bool)


clean = clean_text(30)
wording = clean_text(160)  # past the YAML writer's line width, so folded lines are exercised


@st.composite
def constitutions(draw) -> Constitution:
    k = draw(st.integers(1, 5))
    names = draw(st.lists(clean, min_size=k, max_size=k, unique=True))
    principles = tuple(Principle(n, draw(wording), draw(wording)) for n in names)
    return Constitution(draw(clean), principles)


@PROPERTY
@given(c=constitutions(), suffix=st.sampled_from([".json", ".yaml"]))
def test_property_save_load_round_trip(c, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"c{suffix}"
        save_constitution(c, path)
        assert load_constitution(path) == c


@PROPERTY
@given(k=st.integers(1, 8), data=st.data())
def test_property_integer_variants_distinct(k, data):
    n = data.draw(st.integers(2, min(2**k, 64)), label="n")
    seed = data.draw(st.integers(0, 2**32), label="seed")
    variants = sample_variants(n, k, random.Random(seed))
    assert len(variants) == n
    assert len({v.signs for v in variants}) == n
    assert all(len(v.signs) == k for v in variants)


@PROPERTY
@given(k=st.integers(1, 8), seed=st.integers(0, 2**32))
def test_property_paper_variants(k, seed):
    first, second = sample_variants("paper", k, random.Random(seed))
    assert first.signs == (True,) * k
    assert len(second.signs) == k and not all(second.signs)


@PROPERTY
@given(c=constitutions(), data=st.data())
def test_property_render_lines(c, data):
    k = len(c.principles)
    signs = tuple(data.draw(st.lists(st.booleans(), min_size=k, max_size=k), label="signs"))
    order = data.draw(st.permutations(range(k)), label="order")
    lines = c.render(Variant(signs), order).split("\n")
    assert len(lines) == k
    for n, (line, i) in enumerate(zip(lines, order, strict=True), start=1):
        p = c.principles[i]
        assert line == f"{n}. {p.positive if signs[i] else p.negative}"
    assert c.render(Variant(signs)) == c.render(Variant(signs), list(range(k)))


@PROPERTY
@given(before=constitutions(), after=constitutions(), data=st.data())
def test_property_an_edited_file_reads_back_as_edited(before, after, data):
    """Whatever the wordings (`no`, `1e5`, `#`, `: `), a file updated in place loads as the editor's."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        save_constitution(before, path)
        k = len(before.principles)
        origins = data.draw(st.lists(st.one_of(st.none(), st.integers(0, k - 1)), min_size=len(after.principles)))
        origins = list(dict.fromkeys(origins))  # an entry is used at most once
        origins += [None] * (len(after.principles) - len(origins))
        save_constitution(after, path, read_constitution_file(path), origins[: len(after.principles)])
        assert load_constitution(path) == after
