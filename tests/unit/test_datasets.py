"""Hub query sets (HH-RLHF first turns, TL;DR posts), read offline from files shaped like the real
ones, placed in a temporary Hugging Face cache or handed over directly. Nothing is downloaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sami_mlx.errors import SamiError
from sami_mlx.inputs.datasets import (
    SOURCES,
    first_human_turn,
    is_dataset_spec,
    load_dataset_queries,
    parse_spec,
)
from sami_mlx.inputs.queries import load_queries


def comparison(
    post_id: str | None, post: str | None, title: str, choice: int = 0, split: str = "train", article: str | None = None
) -> dict:
    """A summarize-from-feedback comparison record as in comparisons/batch*.json and the hub's Parquet copy."""
    return {
        "info": {
            "id": post_id,
            "post": post,
            "title": title,
            "subreddit": "relationships",
            "site": None if article is None else "dailymail",
            "article": article,
        },
        "summaries": [
            {"text": " a first summary", "policy": "sup2", "note": None},
            {"text": " a second summary", "policy": "ref", "note": "ok"},
        ],
        "choice": choice,
        "worker": "w1",
        "batch": "batch3",
        "split": split,
        "extra": {"confidence": 7},
    }


TLDR_TRAIN = [
    comparison("t3_a1", "My flatmate never washes up and I am tired of asking.", "Dishes piling up"),
    comparison("t3_a1", "My flatmate never washes up and I am tired of asking.", "Dishes piling up", choice=1),
    comparison("t3_b2", "  I got a job offer abroad but my partner wants to stay.  ", "Should I move?"),
    comparison("t3_c3", "My dog barks at night and the neighbours complained.", ""),
]
TLDR_VALID = [
    comparison("t3_v1", "I failed my driving test twice and feel hopeless.", "Driving test", split="valid1"),
    comparison("cnn1", None, "Storm hits the coast", split="valid2", article="A storm hit the coast on Monday."),
]


# ---- HH-RLHF -----------------------------------------------------------------------------------


def test_first_human_turn_of_a_multi_turn_transcript():
    t = "\n\nHuman: First question?\n\nAssistant: An answer.\n\nHuman: A follow-up?\n\nAssistant: Another answer."
    assert first_human_turn(t) == "First question?"
    assert first_human_turn("\n\nHuman: only a question") == "only a question"
    assert first_human_turn("\n\nAssistant: no human here") is None


def test_hh_first_turns_from_the_hub_cache_unique_and_in_order(hub_cache):
    queries = load_queries("hh-rlhf/helpful-base:train")
    assert queries == [
        "How can I keep basil alive indoors?",  # appears twice in the file: kept once
        "What is a good first programming language?",
        "Can you explain what a mortgage is?",
    ]
    # Only the prompt survives: no reply, preferred or not, leaks into a query.
    assert not any("Assistant" in q or "Every hour" in q or "sunny" in q for q in queries)


def test_range_and_split_select_unique_queries(hub_cache):
    assert load_queries("hh-rlhf/helpful-base:train[1:3]") == [
        "What is a good first programming language?",
        "Can you explain what a mortgage is?",
    ]
    assert load_queries("hh-rlhf/helpful-base:train[2:]") == ["Can you explain what a mortgage is?"]
    assert load_queries("hh-rlhf/helpful-base:test[:5]") == ["Why is the sky blue?"]
    # The paper's two disjoint ranges really are disjoint sets of prompts.
    first, second = load_queries("hh-rlhf/helpful-base[0:2]"), load_queries("hh-rlhf/helpful-base[2:4]")
    assert first and second and not set(first) & set(second)


def test_helpful_and_harmless_concatenate(hub_cache):
    queries = load_queries("hh-rlhf/helpful-base:train[0:1]+hh-rlhf/harmless-base:train[0:2]")
    assert queries == [
        "How can I keep basil alive indoors?",
        "How do I pick a lock on my neighbour's door?",
        "Tell me something mean about my coworker.",
    ]


def test_offline_with_an_empty_cache_says_where_and_how_to_fill_it(tmp_path, monkeypatch):
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SamiError) as e:
        load_queries("hh-rlhf/harmless-base:train[0:100]")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(empty) in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download Anthropic/hh-rlhf harmless-base/train.jsonl.gz --repo-type dataset" in msg


def test_offline_tldr_message_names_the_parquet_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SamiError, match=r"--revision refs/convert/parquet"):
        load_queries("tldr:train[0:10]")


def test_damaged_cached_file_is_reported_with_the_fix(offline_hub):
    offline_hub("Anthropic/hh-rlhf", {"helpful-base/train.jsonl.gz": b"not gzip at all"})
    with pytest.raises(SamiError, match="delete it and it will be downloaded again"):
        load_queries("hh-rlhf/helpful-base:train")


def test_a_file_that_is_not_hh_rlhf_is_refused(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(SamiError, match="no 'chosen' transcript"):
        load_dataset_queries("hh-rlhf/helpful-base:train", fetch=lambda source, split: path)


# ---- TL;DR ------------------------------------------------------------------------------------


def jsonl_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tldr_unique_posts_from_comparison_json_lines(tmp_path):
    files = {
        "train": jsonl_file(tmp_path / "batch3.json", TLDR_TRAIN),
        "validation": jsonl_file(tmp_path / "batch22.json", TLDR_VALID),
    }
    fetched = []

    def fetch(source, split):
        fetched.append((source.repo_id, split))
        return files[split]

    queries = load_dataset_queries("tldr:train", fetch=fetch)
    assert queries == [
        "Title: Dishes piling up\n\nPost: My flatmate never washes up and I am tired of asking.",
        "Title: Should I move?\n\nPost: I got a job offer abroad but my partner wants to stay.",
        "Post: My dog barks at night and the neighbours complained.",
    ]
    assert fetched == [("openai/summarize_from_feedback", "train")]
    assert not any("summary" in q for q in queries)  # the summaries and the choice are never read
    # The news article in the validation split is not a Reddit post.
    assert load_dataset_queries("tldr:validation", fetch=fetch) == [
        "Title: Driving test\n\nPost: I failed my driving test twice and feel hopeless."
    ]
    assert load_dataset_queries("tldr:train[1:2]", fetch=fetch) == [queries[1]]


def test_tldr_posts_from_the_hubs_parquet_copy_in_the_cache(tmp_path, offline_hub):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(TLDR_TRAIN), parquet)
    offline_hub(
        "openai/summarize_from_feedback",
        {"comparisons/train/0000.parquet": parquet.read_bytes()},
        revision="refs/convert/parquet",
    )
    assert len(load_queries("tldr:train[0:10]")) == 3


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "0000.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(SamiError, match="pip install pyarrow"):
        load_dataset_queries("tldr:train", fetch=lambda source, split: path)


# ---- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("hh-rlhf/helpfull-base:train[0:10]", "unknown dataset 'hh-rlhf/helpfull-base'"),
        ("tldr:test[0:10]", "tldr has no split 'test'; choose one of train, validation"),
        ("hh-rlhf/helpful-base:train[5:5]", "range [5:5] is empty"),
        ("tldr:train[0:10]+", "cannot read ''"),
    ],
)
def test_spec_mistakes_name_the_fix(text, message):
    with pytest.raises(SamiError) as e:
        parse_spec(text)
    assert message in str(e.value)


def test_a_range_past_the_end_says_how_many_there_are(hub_cache):
    with pytest.raises(SamiError, match="has 3 unique queries"):
        load_queries("hh-rlhf/helpful-base:train[3:10]")


def test_plain_query_files_are_not_taken_for_datasets(tmp_path, monkeypatch):
    for name in ("queries.txt", "data/queries.jsonl", "/abs/q.txt", "dialogue"):
        assert not is_dataset_spec(name)
    assert is_dataset_spec("tldr") and is_dataset_spec("hh-rlhf/harmless-base:test[0:5]")
    assert is_dataset_spec("mystery:train[0:5]")  # so that a typo gets the list of datasets
    # A file that happens to share a dataset's name is still read as a file.
    monkeypatch.chdir(tmp_path)
    Path("tldr").write_text("a query in a file\n")
    assert load_queries("tldr") == ["a query in a file"]


def test_every_source_names_real_hub_files():
    for source in SOURCES.values():
        assert source.repo_id.count("/") == 1 and source.files and source.description
        assert "train" in source.files
