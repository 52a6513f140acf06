"""Queries, prompt templates and the training configuration, as a user writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import bad_file_test, user_file_error

from sami_mlx.cli.train import make_parser
from sami_mlx.cli.train_flags import build_config
from sami_mlx.config import TrainConfig
from sami_mlx.config_file import config_from_file
from sami_mlx.errors import SamiError
from sami_mlx.inputs.prompts import BUILTIN_TEMPLATES, Template, load_template
from sami_mlx.inputs.queries import BUILTIN_QUERY_SETS, builtin_queries, load_queries


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- queries ------------------------------------------------------------------------------


def test_jsonl_queries(tmp_path):
    rows = [{"query": "How do I bake bread?", "id": 1}, {"query": "  Name a colour. "}, {"query": "Say {hi}"}]
    path = write(tmp_path / "q.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_queries(str(path)) == ["How do I bake bread?", "Name a colour.", "Say {hi}"]


def test_plain_text_queries_skip_blank_lines(tmp_path):
    path = write(tmp_path / "q.txt", "first query\n\n   \n  second query  \nthird\n")
    assert load_queries(str(path)) == ["first query", "second query", "third"]


def test_plain_text_is_not_parsed_as_json(tmp_path):
    path = write(tmp_path / "q.txt", '{"query": "x"}\n')
    assert load_queries(str(path)) == ['{"query": "x"}']


@pytest.mark.parametrize("name", BUILTIN_QUERY_SETS)
def test_builtin_query_sets(name):
    queries = builtin_queries(name)
    assert len(queries) >= 150
    assert len(set(queries)) == len(queries)
    assert all(isinstance(q, str) and q.strip() == q and q for q in queries)
    assert load_queries(name) == queries


def test_builtin_sets_differ():
    assert set(builtin_queries("dialogue")).isdisjoint(builtin_queries("summarization"))


def test_unknown_builtin_set():
    with pytest.raises(SamiError, match="unknown built-in query set 'chitchat'"):
        builtin_queries("chitchat")


# Bad queries and config files: (loader, file name, its text, what the error names besides the file).
BAD_FILES = [
    (load_queries, "bad_line.jsonl", '{"query": "ok"}\n{"query": broken}\n', "line 2"),
    (load_queries, "no_field.jsonl", '{"query": "ok"}\n\n{"prompt": "x"}\n', "line 3"),
    (load_queries, "not_object.jsonl", '["query"]\n', "line 1"),
    (load_queries, "empty_query.jsonl", '{"query": "ok"}\n{"query": "   "}\n', "line 2"),
    (load_queries, "number_query.jsonl", '{"query": 5}\n', "line 1"),
    (load_queries, "empty.jsonl", "", "no queries"),
    (load_queries, "blank.txt", "\n  \n\n", "no queries"),
    (config_from_file, "unknown.yaml", "learnin_rate: 0.1\n", "'learnin_rate'"),
    (config_from_file, "unknown_dash.yaml", "lora-ranks: 4\n", "'lora-ranks'"),
    (config_from_file, "string_for_int.yaml", "steps: four\n", "'steps'"),
    (config_from_file, "fraction_for_int.yaml", "steps: 2.5\n", "'steps'"),
    (config_from_file, "bool_for_int.yaml", "max-tokens: true\n", "'max-tokens'"),
    (config_from_file, "string_for_bool.yaml", "chat_template: 'yes'\n", "'chat_template'"),
    (config_from_file, "list_for_str.yaml", "model: [a, b]\n", "'model'"),
    (config_from_file, "ints_for_list.yaml", "stop: [1, 2]\n", "'stop'"),
    (config_from_file, "null_for_int.yaml", "steps:\n", "'steps'"),
    (config_from_file, "not_mapping.yaml", "- steps\n- 4\n", "mapping"),
    (config_from_file, "bad_yaml.yaml", "steps: [\n", "invalid YAML"),
]

test_bad_input_files_name_file_and_where = bad_file_test(BAD_FILES)


def test_missing_queries_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(SamiError, match="queries file not found"):
        load_queries(str(path))


# --- templates ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_templates(name):
    t = load_template(name)
    assert t.text.count("{constitution}") == 1
    assert t.text.count("{query}") == 1
    filled = t.fill("1. Be kind.", "How are you?")
    assert "1. Be kind." in filled and "How are you?" in filled
    assert "{constitution}" not in filled and "{query}" not in filled


def test_template_file(tmp_path):
    t = load_template(str(write(tmp_path / "t.txt", "Rules:\n{constitution}\nQ: {query}\nA:\n\n")))
    assert t.fill("1. Be brief.", "Why?") == "Rules:\n1. Be brief.\nQ: Why?\nA:"


@pytest.mark.parametrize("missing", ["{query}", "{constitution}"])
def test_template_missing_placeholder(tmp_path, missing):
    text = "Rules:\n{constitution}\nQ: {query}\n".replace(missing, "")
    assert missing in user_file_error(load_template, tmp_path / "t.txt", text)


def test_template_placeholder_twice(tmp_path):
    path = write(tmp_path / "t.txt", "{constitution}\n{query}\n{query}")
    with pytest.raises(SamiError, match=r"\{query\} more than once"):
        load_template(str(path))


def test_template_unknown_placeholders_are_refused_and_braces_escape(tmp_path):
    assert "unknown placeholder {foo}" in user_file_error(
        load_template, tmp_path / "t.txt", "{constitution} {query} {foo}"
    )
    path = write(tmp_path / "typo.txt", "{constitution}\n{qeury}\n{query}")
    with pytest.raises(SamiError, match=r"did you mean \{query\}"):
        load_template(str(path))
    # Doubled braces are literal braces, and do not count as placeholders.
    t = load_template(str(write(tmp_path / "ok.txt", 'Reply as JSON {{"answer": ...}}.\n{constitution}\n{query}')))
    assert t.fill("1. Be kind.", "Hi {x}") == 'Reply as JSON {"answer": ...}.\n1. Be kind.\nHi {x}'
    with pytest.raises(SamiError, match=r"no \{query\} placeholder"):
        load_template(str(write(tmp_path / "esc.txt", "{constitution}\n{{query}}")))


def test_missing_template_file(tmp_path):
    with pytest.raises(SamiError, match="template file not found"):
        load_template(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize(
    "text",
    ["C: {constitution}\nQ: {query}\nA:", "Q: {query}\nC: {constitution}\nA:"],
    ids=["constitution-first", "query-first"],
)
def test_fill_does_not_resubstitute_user_text(text):
    t = Template(text)
    query = "Explain {constitution} and {query} and {0} {}"
    constitution = "1. Quote {query} literally.\n2. Keep {constitution} too."
    filled = t.fill(constitution, query)
    expected = text.replace("{constitution}", "\0").replace("{query}", query).replace("\0", constitution)
    assert filled == expected
    assert filled.count(query) == 1
    assert filled.count(constitution) == 1


# --- config -------------------------------------------------------------------------------


def test_config_file_keys_with_dashes_or_underscores(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "learning-rate: 0.001\nqueries_per_step: 4\nlora-rank: 16\nvariants: 3\n"
        "chat-template: true\nstop: '###'\nheldout: null\n",
    )
    values = config_from_file(str(path))
    assert values == {
        "learning_rate": 0.001,
        "queries_per_step": 4,
        "lora_rank": 16,
        "variants": "3",
        "chat_template": True,
        "stop": ["###"],
        "heldout": None,
    }


def test_empty_config_file(tmp_path):
    assert config_from_file(str(write(tmp_path / "c.yaml", ""))) == {}


def parse(*argv: str) -> TrainConfig:
    return build_config(make_parser().parse_args(list(argv)))


def test_flags_override_file(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "model: file-model\nconstitution: file.yaml\nsteps: 7\nlearning_rate: 0.01\ntemperature: 0.5\n",
    )
    cfg = parse("-c", str(path), "--steps", "9", "--model", "flag-model", "--no-shuffle-principles")
    assert cfg.steps == 9
    assert cfg.model == "flag-model"
    assert cfg.shuffle_principles is False
    # Not given as a flag: the file's value, then the dataclass default.
    assert cfg.learning_rate == 0.01
    assert cfg.temperature == 0.5
    assert cfg.constitution == "file.yaml"
    assert cfg.lora_rank == TrainConfig.lora_rank


def test_flags_without_file_keep_defaults():
    cfg = parse("--model", "m", "--constitution", "c.yaml", "--stop", "END", "STOP")
    assert cfg.stop == ["END", "STOP"]
    assert cfg.iterations == 3 and cfg.schedule == "paper" and cfg.variants == "auto"


def test_the_tests_flags_make_the_tests_config(tiny_config, tiny_flags, tmp_path):
    """tiny_flags (the argv many tests run) gives what tiny_config gives, through the real parser."""
    settings = dict(root=tmp_path, max_ppl_ratio=None, shuffle_principles=False, banned=["x y", "z"], seed=7)
    assert parse(*tiny_flags(**settings)) == tiny_config(**settings).resolved()


def valid(**kw) -> TrainConfig:
    return TrainConfig(model="m", constitution="c.yaml", **kw)


def test_resolved_fills_defaults():
    cfg = valid(template="summarization", training_template="chat", variants="4").resolved()
    assert cfg.generation_template == "summarization"
    assert cfg.training_template == "chat"
    assert cfg.variants == "4"
    assert cfg.out.startswith("runs/")


@pytest.mark.parametrize(
    "name",
    ["iterations", "steps", "queries_per_step", "grad_accumulation", "lora_rank", "max_tokens", "gen_batch_size"],
)
@pytest.mark.parametrize("value", [0, -3])
def test_resolved_rejects_counts_below_one(name, value):
    with pytest.raises(SamiError, match=rf"^--{name.replace('_', '-')} {value}: must be at least 1"):
        valid(**{name: value}).resolved()


@pytest.mark.parametrize("lr", [0.0, -1.0, 1.0, 3.0, math.nan, math.inf])
def test_resolved_rejects_bad_learning_rate(lr):
    with pytest.raises(SamiError, match=r"^--learning-rate"):
        valid(learning_rate=lr).resolved()


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"variants": "1"}, "--variants"),
        ({"variants": "lots"}, "--variants"),
        ({"temperature": -0.1}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"schedule": "cosine"}, "--schedule"),
        ({"optimizer": "sgd"}, "--optimizer"),
        ({"grad_accumulation": 9, "queries_per_step": 8}, "--grad-accumulation"),
        ({"max_ppl_ratio": 1.0}, "--max-ppl-ratio"),
    ],
)
def test_resolved_rejects_bad_settings(kw, flag):
    with pytest.raises(SamiError, match=rf"^{flag}"):
        valid(**kw).resolved()


@pytest.mark.parametrize(("kw", "flag"), [({"model": ""}, "--model"), ({"constitution": ""}, "--constitution")])
def test_resolved_requires_model_and_constitution(kw, flag):
    with pytest.raises(SamiError, match=rf"^{flag} is required"):
        TrainConfig(**{"model": "m", "constitution": "c.yaml", **kw}).resolved()


def test_resolved_accepts_edges():
    cfg = valid(learning_rate=1e-6, temperature=0.0, steps=1, variants="grid").resolved()
    assert (cfg.learning_rate, cfg.steps, cfg.variants) == (1e-6, 1, "grid")
