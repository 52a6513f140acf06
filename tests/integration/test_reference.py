"""Faithful to the reference implementation where it changes results: its filters, its principle
orders, its forced response start, its prompts and judges in the recipes, and the statistics of eval."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import mlx.core as mx
import pytest

import sami_mlx.loop.sampling as sampling
from sami_mlx.config import TrainConfig
from sami_mlx.config_file import config_from_file
from sami_mlx.evaluation.comparisons import Outcome
from sami_mlx.evaluation.judge import BUILTIN_JUDGE_TEMPLATES, load_judge_template
from sami_mlx.evaluation.win_rates import length_controlled_interval, length_controlled_win_rate, summarize
from sami_mlx.inputs.constitution import Variant, variant_orders
from sami_mlx.inputs.prompts import encode_prompt, encode_with_prefix, load_template
from sami_mlx.loop.rollout import Generation, Group, filter_groups
from sami_mlx.model import load_model
from sami_mlx.objective import accuracies

RECIPES = ("hh-rlhf-mistral-7b", "tldr-mistral-7b", "weak-to-strong-mixtral")


# ---- the filters -------------------------------------------------------------------------------


def group(*responses, variants=(Variant((True,)), Variant((False,)))):
    """A group of (text, finish) responses; token ids are the characters' codes."""
    return Group(0, "q", list(variants), [Generation([ord(c) for c in t], t, f) for t, f in responses])


def test_filters_count_each_dropped_group_once_under_the_first_it_fails():
    groups = [
        group(("Fine.", "eos"), ("Also fine.", "stop")),  # kept by every filter
        group(("Cut off in the mid", "length"), ("Done.", "eos")),  # truncated, positive has no full stop
        group(("Done.", "eos"), ("cut off", "length")),  # truncated, the positive ends a sentence
        group(("No full stop", "eos"), ("Ends well.", "eos")),  # positive without a sentence end
        group(("Ends well.", "eos"), ("No full stop", "eos")),  # only the negative lacks it
        group(("Ends well!", "eos"), ("Yes.", "eos")),  # "!" is a sentence end unless the marks say no
        group(("I am sorry.", "eos"), ("Sure.", "eos")),  # banned, also fine otherwise
    ]
    kept, drops = filter_groups(groups)
    assert len(kept) == 7 and drops.total == 0  # every filter is off by default
    kept, drops = filter_groups(
        groups, banned=["sorry"], drop_truncated=True, sentence_end="positive", sentence_end_marks=["."]
    )
    assert (drops.banned, drops.truncated, drops.unfinished) == (1, 2, 2)
    assert kept == [groups[0], groups[4]]  # the reference keeps a negative that lacks a full stop
    kept, drops = filter_groups(groups, sentence_end="all")
    assert (drops.truncated, drops.unfinished) == (0, 4) and groups[5] in kept
    # Without --drop-truncated the sentence-end check is what removes a cut-off positive.
    kept, drops = filter_groups(groups, sentence_end="positive", sentence_end_marks=["."])
    assert drops.unfinished == 3 and groups[2] in kept


def test_sentence_end_positive_checks_every_response_when_the_group_has_no_positive_variant():
    negatives = (Variant((False, True)), Variant((True, False)))
    g = group(("Ends.", "eos"), ("does not end", "eos"), variants=negatives)
    assert filter_groups([g], sentence_end="positive")[1].unfinished == 1
    g = group(("does not end", "eos"), ("Ends.", "eos"), variants=(Variant((False, True)), Variant((True, True))))
    assert filter_groups([g], sentence_end="positive")[1].unfinished == 0  # only the positive is checked


# ---- sampling and scoring in the loop ----------------------------------------------------------


@pytest.fixture
def loop_for(tiny_loop):
    """A SamiLoop on the tiny model with the given settings, and the events it emitted."""

    def make(**settings):
        events = []
        # the reference's two variants per query
        return tiny_loop({"variants": "paper"}, settings, on_event=events.append), events

    return make


def fake_sampler(monkeypatch, reply):
    """Replace generation: the reply to prompt number i is reply(i, prompt text) -> (text, finish)."""
    seen = []

    def generate(model, tokenizer, prompts, *args, **kwargs):
        out = []
        for i, ids in enumerate(prompts):
            text = tokenizer.decode(ids)
            seen.append(text)
            reply_text, finish = reply(i, text)
            tokens = list(tokenizer.encode(reply_text, add_special_tokens=False))
            out.append(Generation(tokens, tokenizer.decode(tokens), finish))
        return out

    monkeypatch.setattr(sampling, "generate_batch", generate)
    return seen


def test_samples_ready_counts_each_filter(loop_for, monkeypatch):
    loop, events = loop_for(banned=["zebra"], drop_truncated=True, sentence_end="positive", sentence_end_marks=["."])
    # Per query group (positive first): kept, banned, truncated, no full stop, kept, identical.
    plan = [
        ("Fine.", "Fine too."),
        ("A zebra.", "Ok."),
        ("Cut", "Ok."),
        ("No stop", "Ok."),
        ("Yes.", "no"),
        ("Same.", "Same."),
    ]
    fake_sampler(
        monkeypatch, lambda i, text: (plan[i // 2][i % 2], "length" if plan[i // 2][i % 2] == "Cut" else "eos")
    )
    kept = loop.sampler.sample(0, 6, split=list(range(6)))
    ready = [e for e in events if type(e).__name__ == "SamplesReady"][0]
    counts = (
        ready.groups,
        ready.dropped_banned,
        ready.dropped_truncated,
        ready.dropped_unfinished,
        ready.dropped_identical,
        ready.dropped_empty,
    )
    assert counts == (2, 1, 1, 1, 1, 0)
    assert [g.generations[0].text for g in kept] == ["Fine.", "Yes."]
    row = ready.to_dict()
    assert row["dropped_truncated"] == 1 and row["dropped_unfinished"] == 1  # as metrics.jsonl stores it


def constitution_lines(prompt: str) -> tuple[str, ...]:
    """The numbered principle lines of a filled prompt, in the order they appear."""
    return tuple(line[3:] for line in prompt.splitlines() if line[:3] in ("1. ", "2. "))


def test_generation_prompts_keep_file_order_unless_shuffled(loop_for, monkeypatch):
    loop, _ = loop_for()
    seen = fake_sampler(monkeypatch, lambda i, text: (f"Reply {i}.", "eos"))
    loop.sampler.sample(0, 8, split=list(range(8)))
    firsts = {constitution_lines(p)[0] for p in seen}
    assert firsts <= {"Be brief.", "Be long."}  # file order: the brevity principle first, in either wording

    loop, _ = loop_for(shuffle_generation=True)
    seen = fake_sampler(monkeypatch, lambda i, text: (f"Reply {i}.", "eos"))
    loop.sampler.sample(0, 8, split=list(range(8)))
    brief_first = [constitution_lines(p)[0] in ("Be brief.", "Be long.") for p in seen]
    assert 0 < sum(brief_first) < len(brief_first)  # both orders occur
    # As in the reference, a group's variants share one order: they differ only in wording.
    assert all(brief_first[i] == brief_first[i + 1] for i in range(0, len(seen), 2))
    again = fake_sampler(monkeypatch, lambda i, text: (f"Reply {i}.", "eos"))
    loop.sampler.sample(0, 8, split=list(range(8)))
    assert again == seen  # drawn from the seed: a resumed run samples the same prompts


def test_response_prefix_is_in_the_prompt_and_starts_every_response(loop_for, monkeypatch):
    loop, events = loop_for(response_prefix=" The post")
    seen = fake_sampler(monkeypatch, lambda i, text: ("" if i == 0 else f" says {i}.", "eos"))
    kept = loop.sampler.sample(0, 4, split=list(range(4)))
    assert all(p.endswith("Assistant: The post") for p in seen)
    ready = [e for e in events if type(e).__name__ == "SamplesReady"][0]
    assert ready.dropped_empty == 1  # a response that is only the forced start is empty
    tokenizer = loop.tokenizer
    _, prefix = encode_with_prefix(tokenizer, "Assistant:", " The post", False)
    for g in kept:
        for gen in g.generations:
            assert gen.tokens[: len(prefix)] == prefix and gen.text.startswith(" The post says")
    rows = [json.loads(line) for line in (loop.out / "iter-01" / "samples.jsonl").read_text().splitlines()]
    assert all(r["responses"][1].startswith(" The post") for r in rows)  # scored, resumed and judged with it


def test_encode_with_prefix_splits_where_the_model_reads_it(tiny_model):
    _, tokenizer, _ = load_model(str(tiny_model))
    head, prefix = encode_with_prefix(tokenizer, "Summary:", " The post", False)
    assert head + prefix == encode_prompt(tokenizer, "Summary: The post", False)
    assert tokenizer.decode(prefix) == " The post"
    assert encode_with_prefix(tokenizer, "Summary:", "", False) == (head, [])
    head, prefix = encode_with_prefix(tokenizer, "Summary:", " The post", True)  # chat: the prefix on its own
    assert tokenizer.decode(prefix) == " The post" and head == encode_prompt(tokenizer, "Summary:", True)


def test_each_constitution_of_a_group_gets_its_own_training_order(loop_for):
    loop, _ = loop_for()
    groups = [
        Group(
            q,
            f"query {q}",
            [Variant((True, True)), Variant((False, True))],
            [Generation([5, 6], "", "eos"), Generation([7], "", "eos")],
        )
        for q in range(24)
    ]
    batch = loop.step_parts.scoring_batch(groups, random.Random(0))
    decode = loop.tokenizer.decode
    # Principle names, not wordings: (brief, kind) or (kind, brief) for each row of S.
    orders = [
        [
            tuple("brief" if w in ("Be brief.", "Be long.") else "kind" for w in constitution_lines(decode(p)))
            for p in rows
        ]
        for rows in batch.prompts
    ]
    assert sum(a != b for a, b in orders) > 3  # rows differ in order as well as wording, as in the reference
    assert sum(a == b for a, b in orders) > 3
    assert loop.step_parts.scoring_batch(groups, random.Random(0)).prompts == batch.prompts  # reproducible (resume)
    off, _ = loop_for(shuffle_principles=False)
    assert all(
        a == b == ("brief", "kind")
        for a, b in (
            [
                tuple("brief" if w in ("Be brief.", "Be long.") else "kind" for w in constitution_lines(decode(p)))
                for p in rows
            ]
            for rows in off.step_parts.scoring_batch(groups, random.Random(0)).prompts
        )
    )


def test_variant_orders_are_uniform_and_independent_across_groups():
    rng = random.Random(0)
    pairs = Counter()
    for q in range(6000):
        first = list(range(3))
        rng.shuffle(first)
        a, b = variant_orders(first, 2, f"0-{q}", True)
        assert a == first and sorted(b) == [0, 1, 2]
        pairs[tuple(a), tuple(b)] += 1
    assert len(pairs) == 36  # every (order, order) pair of 3 principles occurs
    assert max(pairs.values()) < 2 * min(pairs.values())  # ~167 each
    assert variant_orders([1, 0], 3, "k", False) == [[1, 0]] * 3


# ---- the recipes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_follow_the_reference(name):
    cfg = TrainConfig(**config_from_file(name)).resolved()
    generation, training = load_template(cfg.generation_template), load_template(cfg.training_template)
    assert generation.text != training.text
    # Generation lays out an example with a prior turn; training is the plain prompt.
    assert "###" in generation.text and "Human:" in generation.text.split("{constitution}")[0]
    assert "###" not in training.text and len(training.text) < len(generation.text)
    assert cfg.stop == ["Human:", "###"]  # the reference cuts only there
    assert cfg.max_grad_norm == 0  # the reference trainer does not clip
    assert cfg.sentence_end == "positive" and cfg.sentence_end_marks == ["."]
    assert {"[insert", "[]", "]", "Response"} <= set(cfg.banned)
    assert cfg.shuffle_principles and cfg.shuffle_generation
    judge = load_judge_template(cfg.judge_template)
    assert judge.text.rstrip().endswith('Final Response: <"A" or "B">') and "100 words" in judge.text
    if name.startswith("hh"):
        assert {"sorry", "The assistant"} <= set(cfg.banned) and cfg.judge_template == "dialogue"
        assert cfg.response_prefix == ""
    else:
        assert cfg.response_prefix == " The post" and cfg.judge_template == "summarization"
        assert generation.text.endswith("Summary:") and training.text.endswith("Summary:")


def test_builtin_judge_templates_fill():
    for name in BUILTIN_JUDGE_TEMPLATES:
        t = load_judge_template(name)
        filled = t.fill("1. Be kind.", "Hi?", "first", "second")
        assert "1. Be kind." in filled and "Hi?" in filled and "first" in filled and "second" in filled
        assert "{" not in filled.replace("{response", "")


# ---- statistics ----------------------------------------------------------------------------------


def test_length_controlled_interval_and_the_pairs_it_leaves_out():
    # longer: 8 pairs, 6 wins; shorter: 4 pairs, 1 win; equal: 3 pairs.
    scores = [1] * 6 + [0] * 2 + [1] + [0] * 3 + [1, 0.5, 0]
    mine = [9] * 8 + [1] * 4 + [5] * 3
    base = [5] * 15
    lc, strata = length_controlled_win_rate(scores, mine, base)
    assert lc == pytest.approx(0.5 * (6 / 8 + 1 / 4))
    lo, hi = length_controlled_interval(strata)
    # By hand: adjusted rates 7/10 and 2/6, half the root of their summed variances, times 1.96.
    centre, half = 0.5 * (0.7 + 2 / 6), 1.959964 * 0.5 * ((0.7 * 0.3 / 10) + (2 / 6 * 4 / 6 / 6)) ** 0.5
    assert (lo, hi) == (pytest.approx(centre - half, abs=1e-6), pytest.approx(centre + half, abs=1e-6))
    assert lo < lc < hi
    s = summarize([Outcome(i, "A", "A", x) for i, x in enumerate(scores)], mine, base)
    assert s["length_controlled_left_out"] == 3 and s["length_controlled_ci"] == [lo, hi]
    # All wins in both strata still gets an interval of some width.
    lo, hi = length_controlled_interval(length_controlled_win_rate([1] * 4, [9, 9, 1, 1], [5] * 4)[1])
    assert lo < 0.9 and hi == 1.0
    # One direction only: no length-controlled rate, no interval; all equal: the plain rate's.
    assert length_controlled_interval(length_controlled_win_rate([1, 0], [9, 9], [1, 1])[1]) is None
    s = summarize([Outcome(i, "A", "A", x) for i, x in enumerate([1, 0, 1])], [3] * 3, [3] * 3)
    assert s["length_controlled_ci"] == s["win_rate_ci"] and s["length_controlled_left_out"] == 0
    # More pairs, narrower interval.
    narrow = length_controlled_interval(length_controlled_win_rate(scores * 4, mine * 4, base * 4)[1])
    first = length_controlled_interval(strata)
    assert narrow[1] - narrow[0] < first[1] - first[0]


# ---- the objective's accuracies --------------------------------------------------------------------


def test_row_accuracy_is_each_constitution_picking_its_own_response():
    # Row 0 (constitution 0) prefers response 0, row 1 prefers response 0 too: row accuracy 1/2.
    # Column 0 (response 0) prefers constitution 0, column 1 prefers constitution 1: column accuracy 1.
    S = mx.array([[0.0, -5.0], [-1.0, -2.0]])
    assert accuracies(S) == (0.5, 1.0)
    doc = " ".join(accuracies.__doc__.lower().split())  # the docstring says which is which
    assert "row accuracy: how often each constitution picks its own response" in doc
    assert "column accuracy: how often each response picks its own constitution" in doc


def test_every_pair_of_orders_is_a_permutation():
    for order in itertools.permutations(range(3)):
        for o in variant_orders(list(order), 4, "x", True):
            assert sorted(o) == [0, 1, 2]
