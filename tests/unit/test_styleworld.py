"""The style world's program checks and question splits (what the real-text demo measures with)."""

from __future__ import annotations

import pytest

from sami_mlx import styleworld
from sami_mlx.inputs.constitution import Variant
from sami_mlx.inputs.queries import builtin_queries

ALL = styleworld.WORLD
POSITIVE = Variant((True, True, True))
NEGATIVE = Variant((False, False, False))


@pytest.mark.parametrize(
    ("reply", "brief", "listed", "question"),
    [
        ("Water it once a week.", True, False, False),
        ("Water it once a week. Keep it near a window. Feed it in spring.", False, False, False),
        ("1. Water weekly.\n2. Give it light.", True, True, False),
        ("Here are tips:\n1) Water weekly.\n2) Give it light.\nWhich plant is it?", False, True, True),
        ("Is it a fern? Ferns like shade, so keep it away from the window?", True, False, True),
        ("Sure. " + "word " * 60, False, False, False),
        ("1. Only one numbered point here.", True, False, False),
    ],
)
def test_behaviour_is_read_from_the_reply(reply, brief, listed, question):
    assert styleworld.behaviour_of(reply) == {"brief": brief, "list": listed, "question": question}


def test_adherence_follows_the_variant_wording():
    reply = "1. Water weekly.\n2. Give it light."  # brief, a list, no question
    assert styleworld.adherence(reply, ALL, POSITIVE) == {"brief": 1.0, "list": 1.0, "question": 0.0}
    assert styleworld.adherence(reply, ALL, NEGATIVE) == {"brief": 0.0, "list": 0.0, "question": 1.0}


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "   \n",
        "1. The assistant answers in at most two short sentences.\n2. The assistant answers with a numbered list.",
        "Okay! the assistant never asks the person any question.",
    ],
)
def test_an_empty_or_parroting_reply_follows_nothing(reply):
    assert styleworld.adherence(reply, ALL, POSITIVE) == {"brief": 0.0, "list": 0.0, "question": 0.0}
    assert styleworld.adherence(reply, ALL, NEGATIVE) == {"brief": 0.0, "list": 0.0, "question": 0.0}


def test_training_and_evaluation_questions_never_meet():
    pool = builtin_queries(styleworld.QUERY_SET)
    train = styleworld.queries(len(pool) - styleworld.EVAL_SHARE, seed=0)
    evaluate = styleworld.queries(styleworld.EVAL_SHARE, seed=1, split="eval")
    assert not set(train) & set(evaluate)
    assert set(train) | set(evaluate) == set(pool)


def test_queries_are_drawn_by_the_seed_and_repeat_only_past_the_split():
    a, b = styleworld.queries(20, seed=0), styleworld.queries(20, seed=0)
    assert a == b and styleworld.queries(20, seed=1) != a
    many = styleworld.queries(2 * styleworld.EVAL_SHARE, seed=0, split="eval")
    assert len(set(many[: styleworld.EVAL_SHARE])) == styleworld.EVAL_SHARE  # each once before any repeats
    assert set(many) == set(many[: styleworld.EVAL_SHARE])


def test_the_demo_constitution_comes_from_the_world():
    c = styleworld.sub_constitution(["brief", "list"])
    assert [p.name for p in c.principles] == ["brief", "list"]
    assert c.render(c.positive_variant).startswith("1. " + ALL.principles[0].positive)
