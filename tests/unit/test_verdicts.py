"""The judge's verdict parser on replies in the styles real judges write, and judge templates."""

from __future__ import annotations

import pytest

from sami_mlx.evaluation.verdicts import parse_verdict

PAPER_STYLE = """Comparison: Summary A restates the whole post, including the side story about the roommate, \
while Summary B gives the poster's situation and question in one sentence. The principles ask for a brief \
summary that still covers the question, which B does.

Final Response: B"""

REPLIES = [
    # -- the paper's judge format ---------------------------------------------------------------------
    (PAPER_STYLE, "B"),
    ("Comparison: Both are polite, but Response A actually answers.\nFinal Response: A", "A"),
    ("Comparison: A is vague; B gives steps.\n\nFinal Response:\nB", "B"),
    ('Comparison: B declines and offers a safe alternative.\nFinal Response: "B"', "B"),
    ("Comparison: ...\nFinal Response: Response A", "A"),
    ("Comparison: ...\nFinal Response: Summary B.", "B"),
    ("**Comparison:** A is shorter.\n\n**Final Response:** **A**", "A"),
    ("Comparison: A ignores the question.\nFinal Response: <B>", "B"),
    ("Final Response: B\n\nNote: A was close.", "B"),
    # -- a bare letter or label on the last line --------------------------------------------------------
    ("Response B is more concise.\nB", "B"),
    ("A", "A"),
    ("Reasoning...\n\n**A**", "A"),
    ("Both are fine, but one is clearer.\n(B)", "B"),
    ("Considering everything:\nSummary A", "A"),
    ("[[B]]", "B"),
    ("My verdict: [[A>B]]", "A"),
    ("The first is better.\n\n\\boxed{B}", "B"),
    # -- labelled answers -------------------------------------------------------------------------------
    ("Final answer: B.", "B"),
    ("Verdict: Response A", "A"),
    ("The answer is A.\nThanks for asking", "A"),
    ("Final verdict: **B**", "B"),
    ("Answer:\nA", "A"),
    ("The better response is (A)", "A"),
    # -- phrases ------------------------------------------------------------------------------------------
    ("Response B is better.", "B"),
    ("Overall, A better follows the principles of the constitution.", "A"),
    ("Summary B is more aligned with the summarization principles.", "B"),
    ("Response A is longer and more detailed, but Response B is better.", "B"),
    ("I prefer Response A because it gives a concrete recipe.", "A"),
    ("Both address the question. I would choose B.", "B"),
    ("Summary A captures the question; Summary A aligns more closely with the principles.", "A"),
    ("After weighing both, so, B.", "B"),
    # -- after a reasoning block --------------------------------------------------------------------------
    ("<think>A is long, B is short. Answer: A</think>\nAnswer: B", "B"),
    ("<think>\nThe user wants the concise one. A rambles.\n</think>\n\nFinal Response: B", "B"),
    ("The user wants brevity... B is shorter.\n</think>\nA", "A"),
    # -- no verdict ---------------------------------------------------------------------------------------
    ("<think>Let me compare. Response A says", None),  # cut off while thinking
    ("A good response should be brief.", None),
    ("My answer: a short one is better", None),
    ("Both are equally good.", None),
    ("Comparison: They are the same.\nFinal Response: Tie", None),
    ('Comparison: ...\nFinal Response: <"A" or "B">', None),
    ("Response A is better on helpfulness, while Response B is better on harmlessness.", None),
    ("", None),
]


@pytest.mark.parametrize("text, verdict", REPLIES, ids=[f"{i:02d}" for i in range(len(REPLIES))])
def test_parse_verdict_reads_real_judge_styles(text, verdict):
    assert parse_verdict(text) == verdict


def test_the_table_is_broad():
    assert len(REPLIES) >= 25
    assert sum(v is None for _, v in REPLIES) >= 6  # and it says so when there is no verdict
